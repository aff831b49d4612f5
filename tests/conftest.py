"""Shared fixtures: a tiny random LLaMA with an offline character-level tokenizer, and the data folder."""

import atexit
import json
import os
import shutil
import socket
import string
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# Before anything imports `datasets`, which reads these once: the suite never asks the hub (a hub name fails at
# once, as it does offline), and its Arrow caches live and die with the session, never reused from an earlier one.
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = DATASETS_CACHE = tempfile.mkdtemp(prefix="llama-adapter-datasets-")
atexit.register(shutil.rmtree, DATASETS_CACHE, ignore_errors=True)

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llama_adapter import AdapterConfig
from llama_adapter.config import VisualConfig
from llama_adapter.model import LlamaAdapterModel

# The models here are far too small to gain from intra-op threads, and on a loaded machine OpenMP's
# spinning workers made a 64-wide matmul take milliseconds instead of microseconds.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
# Small on purpose: with few symbols a random model still emits spaces and newlines often, which is what
# makes the streamer hand out several pieces.
CHARS = list(string.ascii_lowercase + string.digits + " .,:#?!'-\n") + list(string.ascii_uppercase)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    # BPE without merges is a character tokenizer that needs no pre-tokenizer, so whitespace survives as tokens.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIALS)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def tiny_config(tokenizer, **overrides) -> LlamaConfig:
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention: two query heads per key/value head
        "max_position_embeddings": 512,  # the default --max-len fits
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return LlamaConfig(**(settings | overrides))


@pytest.fixture
def make_base(tokenizer):
    def make(attn_implementation="sdpa", seed=0, **config_overrides) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        base = LlamaForCausalLM._from_config(
            tiny_config(tokenizer, **config_overrides), attn_implementation=attn_implementation
        )
        return base.eval().requires_grad_(False)

    return make


@pytest.fixture
def make_model(make_base, tokenizer):
    """Same seed, same base weights: two models built with equal arguments differ only where a test changes them."""

    def make(
        attn_implementation="sdpa",
        adapter_len=3,
        adapter_layers=2,
        seed=0,
        visual: VisualConfig | None = None,
        **config_overrides,
    ) -> LlamaAdapterModel:
        base = make_base(attn_implementation, seed, **config_overrides)
        torch.manual_seed(seed + 1000)  # the prompts' random init, independent of how many base weights came first
        config = AdapterConfig(adapter_len=adapter_len, adapter_layers=adapter_layers)
        return LlamaAdapterModel(base, tokenizer, config, visual)

    return make


def _randomize_adapter(model: LlamaAdapterModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prompt in model.prompts.values():
            prompt.adapter_prompt.copy_(torch.randn(prompt.adapter_prompt.shape, generator=generator))
            # Large enough to move the logits clearly, distinct per head so a head mix-up would show.
            prompt.adapter_gate.copy_(torch.rand(prompt.adapter_gate.shape, generator=generator) * 3 - 1.5)


@pytest.fixture
def randomize_adapter():
    """Sets non-zero gates and fresh prompts, so the adapter actually changes the output."""
    return _randomize_adapter


# Sixteen short instructions a tiny model learns something of in a few steps.
TRAINING_ROWS = [
    {"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"}
    for w in ["red", "blue", "green", "gold", "pink", "gray", "teal", "navy"]
] + [{"instruction": "Add the numbers.", "input": f"{a} and {a}", "output": f"{2 * a}"} for a in range(1, 9)]


@pytest.fixture
def rows_file(tmp_path) -> Path:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(TRAINING_ROWS))
    return path


@pytest.fixture
def tiny_base_dir(make_base, tokenizer, tmp_path) -> Path:
    """The tiny base of make_base() as a Hugging Face folder, as the commands take a base; same seed, same weights."""
    folder = tmp_path / "tiny-llama"
    make_base().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("LLAMA_ADAPTER_DATA") or REPO_ROOT / ".." / "shared" / "data")  # set but empty: unset
    path = (path if path.is_absolute() else REPO_ROOT / path).resolve()
    if not path.is_dir():
        pytest.skip(f"data folder {path} not found (set LLAMA_ADAPTER_DATA to run tests on the real data)")
    return path


TINY_CLIP = "tiny-test-clip"


def register_tiny_clip(folder: Path) -> str:
    """Registers a 2-layer, 32-wide open_clip architecture (random init, built in milliseconds); returns its name."""
    import open_clip

    config = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return TINY_CLIP


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("clip-configs"))


def write_image(path, colour, size=40):
    image = Image.new("RGB", (size, size), "white")
    image.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    image.save(path)
    return path


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / f"{name}.png", name) for name in ("red", "blue")]


@pytest.fixture
def multimodal(make_model, tiny_clip):
    """A LLaMA-Adapter with the tiny random CLIP: K=4 prompts in the top 3 layers."""

    def make(**kwargs) -> LlamaAdapterModel:
        return make_model(adapter_len=4, adapter_layers=3, visual=VisualConfig(clip_model=tiny_clip), **kwargs)

    return make


# ----------------------------------------------------------------------------------------------------------
# The demo, served on localhost (tests/test_demo*.py)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def served_folders(tmp_path_factory, tiny_clip):
    """A tiny base and two adapters on it, text and multimodal, as folders: what the demo and the API serve."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    # Large random weights: at the default 0.02 the greedy output collapses into one repeated character.
    base = LlamaForCausalLM._from_config(tiny_config(tokenizer, initializer_range=0.3), attn_implementation="sdpa")
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for seed, (name, visual) in enumerate([("text", None), ("visual", VisualConfig(clip_model=tiny_clip))]):
        model = LlamaAdapterModel.from_base(str(root / "base"), visual=visual)
        _randomize_adapter(model, seed)
        model.save(root / name)
    return SimpleNamespace(root=root, base=str(root / "base"), text=str(root / "text"), visual=str(root / "visual"))


@pytest.fixture(scope="session")
def served(served_folders):
    """A demo offering a text adapter and a multimodal adapter on one tiny base.

    Yields its url, the choices it serves (label -> model), the folder (and label) of each adapter, the tmp root.
    """
    from llama_adapter.config import DemoConfig, ModelConfig
    from llama_adapter.serving.demo import BASE_CHOICE, build_app, launch, load_choices

    folders = served_folders
    choices = load_choices(ModelConfig(base=folders.base, precision="fp32"), (folders.text, folders.visual))
    spaced_answers(choices[BASE_CHOICE].base)
    app = build_app(choices)
    launch(app, DemoConfig(port=free_port()), block=False)
    yield SimpleNamespace(
        url=app.local_url, choices=choices, root=folders.root, text=folders.text, visual=folders.visual
    )
    app.close()


@pytest.fixture(scope="module")
def shelf_served(served):
    """The demo as it opens with no flags, on a shelf of the tiny base: `alpaca` (served.text's adapter) and `shapes`
    (served.visual's). Yields its url and choices; the shelf stays in place for the module, as the page reads it."""
    from llama_adapter import shelf
    from llama_adapter.config import DemoConfig, ModelConfig
    from llama_adapter.serving.demo import BASE_CHOICE, build_app, launch, load_choices

    folder = served.root / "shelf"
    if not folder.exists():
        shutil.copytree(served.text, folder / "alpaca")
        shutil.copytree(served.visual, folder / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shelf, "FOLDER", folder)
        choices = load_choices(ModelConfig(base=str(served.root / "base"), precision="fp32"), ())
        spaced_answers(choices[BASE_CHOICE].base)
        app = build_app(choices)
        launch(app, DemoConfig(port=free_port()), block=False)
        yield SimpleNamespace(url=app.local_url, choices=choices)
        app.close()


@pytest.fixture(scope="module")
def all_cores():
    """Every core for a module's tests (`usefixtures`): the real model gains from them; the tiny models run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def no_step_for(steps: list, seconds: float) -> bool:
    """Whether no step was added to `steps` (a forward hook's record of the base's calls) in the next `seconds`."""
    before = len(steps)
    time.sleep(seconds)
    return len(steps) == before


def spaced_answers(base) -> None:
    """Answers of exactly max_new_tokens characters, a space after each one the model picks.

    No special tokens, so no answer ends early whatever the random weights are; the spaces make the streamer
    (which hands out whole words) send a piece per word, as it does for real text.
    """
    space = build_tokenizer().convert_tokens_to_ids(" ")

    def steer(module, args, kwargs, output):
        logits = output.logits.clone()
        logits[..., :4] = float("-inf")  # <unk> <pad> <s> </s>
        after_word = kwargs["input_ids"][:, -1] != space
        logits[after_word, -1, space] = 1e4  # certain, yet finite so sampling still works
        output.logits = logits
        return output

    base.register_forward_hook(steer, with_kwargs=True)
