"""Adapters saved before the SharedBase redesign (commit e1c06de, tests/fixtures/e1c06de) load and compute what they
computed then; a training run stopped before the call context (commit 7deb619) resumes as it would have then."""

import csv
import shutil
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from llama_adapter import AdapterConfig, LlamaAdapterModel
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

FIXTURE = Path(__file__).parent / "fixtures" / "e1c06de"
CASES = ["llama-adapter", "series", "parallel", "lora", "adalora", "dylora", "prefix", "ptuning-v2", "prompt"]


@pytest.fixture(scope="module")
def expected() -> dict:
    open_clip.add_model_config(FIXTURE)  # the tiny CLIP architecture the multimodal adapter names
    return load_file(FIXTURE / "expected_logits.safetensors")


def load(name: str) -> LlamaAdapterModel:
    with warnings.catch_warnings():  # the adapters name the base by the path it had where they were made
        warnings.filterwarnings("ignore", message=".*loading onto .* of the same shape")
        return LlamaAdapterModel.load(FIXTURE / name, base=str(FIXTURE / "base"), device="cpu")


@pytest.mark.parametrize("name", CASES)
def test_an_adapter_saved_by_the_earlier_design_computes_the_same_logits(expected, name):
    model = load(name)
    with torch.no_grad():
        logits = model(expected["input_ids"], expected["attention_mask"])
    real = expected["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[name][real], rtol=1e-5, atol=1e-5)


def test_a_multimodal_adapter_saved_by_the_earlier_design_sees_the_images_as_it_did(expected):
    model = load("llama-adapter-multimodal")
    features = model.encode_images([FIXTURE / "image0.png", FIXTURE / "image1.png"])
    torch.testing.assert_close(features, expected["llama-adapter-multimodal.features"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = model(expected["input_ids"], expected["attention_mask"], features)
    real = expected["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected["llama-adapter-multimodal"][real], rtol=1e-5, atol=1e-5)


V2_RUN = Path(__file__).parent / "fixtures" / "7deb619" / "v2-run"


def losses(metrics_csv: Path) -> list[tuple[str, str, str]]:
    with open(metrics_csv, newline="") as f:
        return [(row["step"], row["train_loss"], row["val_loss"]) for row in csv.DictReader(f)]


def test_a_v2_run_stopped_before_the_call_context_resumes_as_it_would_have_then(
    make_base, tokenizer, tmp_path, monkeypatch
):
    """Its checkpoint paired AdamW's moments with the parameters by position (V2's scales, in a second group, out
    of place): they still go back to the parameters they belong to, and the run ends as it did uninterrupted."""
    shutil.copytree(V2_RUN, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)  # the run was made with relative paths, which its saved settings hold
    adapter = AdapterConfig(method="llama-adapter-v2", adapter_len=3, adapter_layers=2)
    model = LlamaAdapterModel(make_base(), tokenizer, adapter)
    config = TrainConfig(
        data="rows.json", out="stopped", epochs=2, batch_size=2, grad_accum=2, lr=0.05, val_fraction=0.25, warmup=0.2,
        save_every=2,
    )  # fmt: skip
    assert train(config, model.config, model)["resumed_from_step"] == 2
    expected, resumed = (
        load_file(V2_RUN / "whole" / "adapter.safetensors"),
        load_file(tmp_path / "stopped" / "adapter.safetensors"),
    )
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    assert losses(tmp_path / "stopped" / "metrics.csv") == losses(V2_RUN / "whole" / "metrics.csv")
