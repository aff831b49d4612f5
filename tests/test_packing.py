"""--packing: whole rows laid end to end in one sequence train exactly as the same rows padded in a batch.

Each packed row restarts its positions and attends only to itself (and to the adapter's prompts), so the loss and
every adapter gradient equal those of the unpacked rows; `check_packed_equals_unpacked` is also what the CUDA check
(tests/test_cuda.py) runs on a GPU.
"""

import json

import pytest
import torch
from test_methods import SMALL, adapter, randomize

from llama_adapter import AdapterConfig
from llama_adapter.data import batching, encoding
from llama_adapter.data.batching import make_batch, packed_image_index
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train
from llama_adapter.train.plan import fetch, step_groups

LENGTHS = [7, 12, 5, 9, 3, 11]  # two packs of up to 24 tokens: 7 + 12 + 5 and 9 + 3 + 11


def examples(vocab_size: int, lengths=LENGTHS, seed: int = 3) -> list[encoding.Example]:
    """Random rows whose second half is the response, of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(4, vocab_size, (n,), generator=generator).tolist()
        rows.append(encoding.Example(ids, [encoding.IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    return rows


def loss_and_gradients(model: LlamaAdapterModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = model.adapter_state()
    for param in params.values():
        param.grad = None
    loss = model.loss(**{name: tensor.to(model.device) for name, tensor in batch.items()})
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in params.items() if param.grad is not None}


def check_packed_equals_unpacked(
    model: LlamaAdapterModel, device, dtype: torch.dtype = torch.float64, atol: float = 1e-5
) -> None:
    """Six rows as two packs against the same rows padded in one batch: equal loss and adapter gradients.

    In float64 by default: the two layouts run different attention kernels, whose float32 rounding differs by more
    than 1e-5 once trained weights make the attention sharp; what is checked is the arithmetic, not the rounding.
    A multimodal adapter gets a random image feature for every row but the fourth, which has none.
    """
    rows = examples(model.base.config.vocab_size)
    packs = [encoding.Pack(rows[:3]), encoding.Pack(rows[3:])]
    pad = 0
    padded, packed = batching.collate(rows, pad), batching.collate_packed(packs, pad)
    assert packed["input_ids"].shape == (2, 24) and padded["input_ids"].shape == (6, 12)
    if model.multimodal:
        generator = torch.Generator().manual_seed(5)
        images = {
            "image_features": torch.randn(len(rows), model.image_encoder.clip_dim, generator=generator),
            "has_image": torch.tensor([True, True, True, False, True, True]),
        }
        padded |= images
        packed |= images | {"image_index": packed_image_index(packs, packed["input_ids"].shape[1])}
    model.to(device, dtype).eval()  # no dropout (LoRA's): its masks could not match between the two layouts
    expected_loss, expected = loss_and_gradients(model, padded)
    loss, gradients = loss_and_gradients(model, packed)
    torch.testing.assert_close(loss, expected_loss, atol=atol, rtol=atol)
    assert gradients.keys() == expected.keys() and expected
    for name, gradient in expected.items():
        assert gradient.abs().max() > 0, name  # a gradient that is there to compare
        torch.testing.assert_close(gradients[name], gradient, atol=atol, rtol=atol, msg=name)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["llama-adapter", "lora", "series", "dylora"])
def test_packed_rows_train_exactly_as_padded_ones(make_base, tokenizer, method, attention):
    torch.manual_seed(1000)
    model = LlamaAdapterModel(make_base(attention), tokenizer, AdapterConfig(method=method, **SMALL))
    randomize(model)
    check_packed_equals_unpacked(model, "cpu")


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_rows_each_keep_their_own_image(multimodal, randomize_adapter, attention):
    model = multimodal(attn_implementation=attention)
    randomize_adapter(model)
    check_packed_equals_unpacked(model, "cpu")


def test_without_restarting_positions_the_rows_would_see_each_other(make_model, randomize_adapter):
    """The check above can fail: one plain causal sequence over the same tokens gives another loss."""
    model = make_model()
    randomize_adapter(model)
    rows = examples(model.base.config.vocab_size)
    packed = batching.collate_packed([encoding.Pack(rows[:3]), encoding.Pack(rows[3:])], 0)
    plain = {key: packed[key] for key in ("input_ids", "attention_mask", "labels")}
    assert not torch.allclose(model.loss(**packed), model.loss(**plain), atol=1e-4)


def test_make_batch_packs_images_from_the_feature_cache(multimodal, randomize_adapter, images):
    model = multimodal()
    randomize_adapter(model)
    rows = examples(model.base.config.vocab_size)
    for row, image in zip(rows, [images[0], images[1], None, images[1], None, images[0]]):
        row.image = image
    cache = model.feature_cache()
    packs = [encoding.Pack(rows[:3]), encoding.Pack(rows[3:])]
    packed, padded = make_batch(packs, 0, cache), make_batch(rows, 0, cache)
    assert packed["image_index"].tolist()[1][:9] == [3] * 9
    torch.testing.assert_close(model.loss(**packed), model.loss(**padded), atol=1e-5, rtol=1e-5)


def test_packs_fill_sequences_without_splitting_or_losing_a_row():
    lengths = [int(n) for n in torch.randint(1, 200, (500,), generator=torch.Generator().manual_seed(0))]
    packs = batching.packs(lengths, 512, seed=0)
    members = sorted(i for pack in packs for i in pack)
    assert members == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 512 for pack in packs)
    # Best-fit decreasing leaves little room: at most one pack more than the tokens strictly need.
    assert len(packs) <= -(-sum(lengths) // 512) + 1
    assert batching.packs(lengths, 512, seed=0) == packs
    assert batching.packs(lengths, 512, seed=1) != packs  # equal lengths are taken in another order


def test_collate_packed_restarts_positions_and_marks_the_fill():
    rows = [encoding.Example([5, 6, 7], [-100, 6, 7]), encoding.Example([8, 9], [-100, 9]), encoding.Example([4], [4])]
    batch = batching.collate_packed([encoding.Pack(rows[:2]), encoding.Pack(rows[2:])], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [4, -100, -100, -100, -100]]


def test_each_epoch_shuffles_the_same_packs_into_batches(tokenizer):
    packs = [[0, 1], [2], [3, 4, 5], [6]]
    first, second = (step_groups(None, 2, 1, seed, packs) for seed in (1, 2))
    assert sorted(member for step in first for batch in step for member in batch) == sorted(packs)
    assert [len(batch) for step in first for batch in step] == [2, 2] and first != second
    rows = [{"instruction": f"Say {n}.", "input": "", "output": str(n)} for n in range(3)]
    encoded, _ = encoding.encode_all(tokenizer, rows, 512)
    pack = fetch(encoded, [2, 0])
    assert [example.input_ids for example in pack.examples] == [encoded[2].input_ids, encoded[0].input_ids]
    assert fetch(encoded, 1) == encoded[1]


def test_training_with_packing_takes_fewer_steps_and_learns(make_model, rows_file, tmp_path):
    model = make_model()
    cfg = TrainConfig(
        data=str(rows_file), out=str(tmp_path / "run"), epochs=3, batch_size=2, val_fraction=0.25, lr=0.01
    )
    packed = TrainConfig(**(vars(cfg) | {"out": str(tmp_path / "packed"), "packing": True}))
    plain_summary = train(cfg, model.config, model)
    summary = train(packed, make_model().config, make_model())
    assert summary["steps"] < plain_summary["steps"]  # 12 training rows of ~50 tokens: several per 512-token pack
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert summary["val_loss_before"] == pytest.approx(plain_summary["val_loss_before"], rel=1e-6)  # same rows held out
    settings = json.loads((tmp_path / "packed" / "train_config.json").read_text())
    assert settings["packing"] is True


def test_packing_refuses_methods_with_virtual_tokens(make_base, tokenizer, rows_file, tmp_path):
    model = adapter(make_base, tokenizer, "prefix")
    cfg = TrainConfig(data=str(rows_file), out=str(tmp_path / "run"), packing=True)
    with pytest.raises(ValueError, match="--packing does not work with --method prefix"):
        train(cfg, model.config, model)
    assert not (tmp_path / "run").exists()
