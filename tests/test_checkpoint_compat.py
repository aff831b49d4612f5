"""Adapters saved before the SharedBase redesign (commit e1c06de, tests/fixtures/e1c06de) load and compute what they
computed then."""

import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from llama_adapter import LlamaAdapterModel

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
