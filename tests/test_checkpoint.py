"""Adapter-only checkpoints: round trip, file layout, base identity checks, and errors that name what is wrong."""

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_adapter.adapter_files import CONFIG_NAME, WEIGHTS_NAME, check_same_base, read_config
from llama_adapter.base import loading, structure
from llama_adapter.model import LlamaAdapterModel

BASE_NAME = "tiny-random-llama"


@pytest.fixture
def saved(make_model, randomize_adapter, tmp_path):
    """A trained-looking adapter (random prompts and gates) saved to tmp_path/adapter."""
    model = make_model(adapter_len=3, adapter_layers=2)
    model.base.name_or_path = BASE_NAME
    randomize_adapter(model, seed=5)
    out = tmp_path / "adapter"
    model.save(out)
    return model, out


def _ids(tokenizer):
    return tokenizer("Hello, adapter!", return_tensors="pt")["input_ids"]


def test_round_trip_restores_the_adapter(saved, make_model, tokenizer):
    original, out = saved
    fresh = make_model(adapter_len=3, adapter_layers=2)
    with torch.no_grad():
        expected = original(_ids(tokenizer))
        assert not torch.allclose(fresh(_ids(tokenizer)), expected, atol=1e-4)
        fresh.load_adapter_weights(out / WEIGHTS_NAME)
        assert torch.equal(fresh(_ids(tokenizer)), expected)
    for name, param in original.adapter_state().items():
        assert torch.equal(fresh.adapter_state()[name], param)


def test_save_writes_exactly_two_files_and_no_temporaries(saved):
    model, out = saved
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])
    model.save(out)  # overwriting an existing checkpoint must not leave anything behind either
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])


def test_config_records_adapter_and_base_identity(saved):
    model, out = saved
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["format_version"] == 1
    assert config["adapter"] == {"adapter_len": 3, "adapter_layers": 2, "method": "llama-adapter"}
    assert config["base"] == {
        "name": BASE_NAME,
        "architecture": "LlamaForCausalLM",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": model.base.config.vocab_size,
    }
    assert config["trainable_parameters"] == 2 * (3 * 64 + 4)
    assert read_config(out) == config


def test_weights_file_holds_only_adapter_tensors(saved):
    model, out = saved
    tensors = load_file(out / WEIGHTS_NAME)
    assert set(tensors) == {f"layers.{i}.adapter_{kind}" for i in (2, 3) for kind in ("prompt", "gate")}
    assert all(re.fullmatch(r"layers\.\d+\.adapter_(prompt|gate)", name) for name in tensors)
    assert tensors["layers.3.adapter_prompt"].shape == (3, 64)
    assert tensors["layers.3.adapter_gate"].shape == (4,)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # Size guard against base weights sneaking in under adapter-looking names.
    assert sum(t.numel() for t in tensors.values()) == model.num_trainable_parameters()


# ----------------------------------------------------------------------------------------------------------
# Refusing a different base


def test_check_same_base_rejects_a_different_shape(saved, make_base):
    _, out = saved
    recorded = read_config(out)["base"]
    other = make_base(num_hidden_layers=3)
    other.name_or_path = BASE_NAME
    with pytest.raises(ValueError, match=r"num_hidden_layers: adapter has 4, base has 3") as info:
        check_same_base(recorded, structure.base_identity(other), out / CONFIG_NAME)
    assert str(out / CONFIG_NAME) in str(info.value)
    assert "hidden_size" not in str(info.value)  # only the differing fields are named


def test_check_same_base_names_every_differing_field(saved, make_base):
    _, out = saved
    recorded = read_config(out)["base"]
    other = make_base(num_key_value_heads=4, hidden_size=32)
    other.name_or_path = BASE_NAME
    with pytest.raises(ValueError) as info:
        check_same_base(recorded, structure.base_identity(other), out / CONFIG_NAME)
    assert "num_key_value_heads" in str(info.value) and "hidden_size" in str(info.value)


def test_check_same_base_accepts_same_shape_and_warns_on_other_name(saved, make_base):
    _, out = saved
    recorded = read_config(out)["base"]
    same = make_base()
    same.name_or_path = BASE_NAME
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_same_base(recorded, structure.base_identity(same), out / CONFIG_NAME)
    same.name_or_path = "some-other-llama"
    with pytest.warns(UserWarning, match="some-other-llama"):
        check_same_base(recorded, structure.base_identity(same), out / CONFIG_NAME)


def test_load_refuses_a_different_base(saved, make_base, tokenizer, monkeypatch):
    """LlamaAdapterModel.load end to end, with the hub loader swapped for the tiny model."""
    original, out = saved

    def fake_load_base(name, dtype, attn_implementation=None, quantize="none", device="cpu", named_by="--base"):
        base = make_base(num_hidden_layers=4 if name == BASE_NAME else 2)
        base.name_or_path = name
        return base, tokenizer

    monkeypatch.setattr(loading, "load_base", fake_load_base)
    loaded = LlamaAdapterModel.load(out, device="cpu")
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(ids), original(ids))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        LlamaAdapterModel.load(out, base="shallow-llama", device="cpu")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no adapter config"),
        ("{not json", "invalid JSON at line 1"),
        (json.dumps({"format_version": 1, "adapter": {}}), "'base'"),
        (json.dumps({"format_version": 99, "adapter": {}, "base": {}}), "format_version 99"),
    ],
    ids=["missing", "invalid-json", "missing-field", "future-version"],
)
def test_read_adapter_config_errors_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / CONFIG_NAME).write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        read_config(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Bad weights files


@pytest.mark.parametrize("keep", [0, 7, 60, -10], ids=["empty", "header-cut", "header-garbled", "data-cut"])
def test_corrupt_weights_file_names_the_file(saved, keep):
    model, out = saved
    path = out / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        model.load_adapter_weights(path)


def test_missing_weights_file_is_a_value_error(tmp_path, make_model):
    path = tmp_path / WEIGHTS_NAME
    with pytest.raises(ValueError, match=re.escape(str(path))):
        make_model().load_adapter_weights(path)


def _rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_wrong_shape_names_the_tensor(saved):
    model, out = saved
    path = out / WEIGHTS_NAME
    _rewrite(path, lambda t: t.update({"layers.2.adapter_prompt": torch.zeros(5, 64)}))
    with pytest.raises(ValueError, match=r"layers\.2\.adapter_prompt has shape \[5, 64\], expected \[3, 64\]"):
        model.load_adapter_weights(path)


def test_missing_and_unexpected_tensors_are_named(saved):
    model, out = saved
    path = out / WEIGHTS_NAME
    _rewrite(path, lambda t: t.pop("layers.3.adapter_gate"))
    with pytest.raises(ValueError, match=r"missing tensors \['layers\.3\.adapter_gate'\]"):
        model.load_adapter_weights(path)
    _rewrite(path, lambda t: t.update({"layers.3.adapter_gate": torch.zeros(4), "lm_head.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['lm_head\.weight'\]"):
        model.load_adapter_weights(path)


def test_adapter_with_other_layer_count_is_refused(saved, make_model):
    _, out = saved
    deeper = make_model(adapter_len=3, adapter_layers=3)
    with pytest.raises(ValueError, match=r"layers\.1\.adapter_"):
        deeper.load_adapter_weights(out / WEIGHTS_NAME)


def test_failed_load_leaves_the_model_unchanged(saved, make_model):
    _, out = saved
    path = out / WEIGHTS_NAME
    # The last tensor in load order is wrong; every earlier one is valid and differs from the target model's.
    _rewrite(path, lambda t: t.update({"layers.3.adapter_gate": torch.zeros(7)}))
    target = make_model(adapter_len=3, adapter_layers=2)
    before = {name: p.detach().clone() for name, p in target.adapter_state().items()}
    with pytest.raises(ValueError, match="layers.3.adapter_gate"):
        target.load_adapter_weights(path)
    for name, param in target.adapter_state().items():
        assert torch.equal(param, before[name]), f"{name} changed by a load that failed"


def test_adapters_sharing_a_base_take_turns(saved, make_model, tokenizer, tmp_path):
    """Loaded alongside another model, an adapter reuses its base object, and each call runs with its own prompts."""
    original, out = saved
    other = make_model(adapter_len=2, adapter_layers=1)  # a different shape: other layers carry prompts
    other.base.name_or_path = BASE_NAME
    with torch.no_grad():
        other_alone = other(_ids(tokenizer))
        loaded = LlamaAdapterModel.load(out, alongside=other)
        assert loaded.base is other.base
        assert torch.equal(loaded(_ids(tokenizer)), original(_ids(tokenizer)))
        assert torch.equal(other(_ids(tokenizer)), other_alone)  # its prompts back, the loaded one's gone
        assert torch.equal(loaded(_ids(tokenizer)), original(_ids(tokenizer)))
