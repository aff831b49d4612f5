"""The adapter folder: `adapter.safetensors` (the trained tensors, float32, nothing pickled) and
`llama_adapter_config.json` (the method and its settings, the image encoder, and the shape of the base it was trained
on). An adapter of one of PEFT's methods also gets PEFT's own two files, `adapter_model.safetensors` and
`adapter_config.json`, so that `PeftModel.from_pretrained` loads the folder too. Folders written before PEFT's files
joined ours keep our config under PEFT's name, `adapter_config.json` (with a `format_version`), and read as they are."""

import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import files
from .data.templates import TEMPLATES

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "llama_adapter_config.json"
LEGACY_CONFIG_NAME = "adapter_config.json"  # our config's name in older folders
PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"  # PEFT's names (peft.utils)
FORMAT_VERSION = 1
# What `write` callers save: our config's top-level fields.
TOP_LEVEL = {"format_version", "adapter", "visual", "base", "trainable_parameters", "template"}


def write(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    peft: tuple[dict, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write an adapter folder, each file replaced atomically: our tensors and config, and with `peft` (PEFT's config
    and tensors, as `PeftModel.save_pretrained` writes them) PEFT's two files. The files of an earlier adapter there
    that this one does not replace are removed, so that neither library reads them as this adapter's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tensors(out_dir / WEIGHTS_NAME, {name: tensor.detach().float() for name, tensor in tensors.items()})
    if peft is not None:
        _write_tensors(out_dir / PEFT_WEIGHTS_NAME, peft[1])
        files.write_json(out_dir / PEFT_CONFIG_NAME, peft[0])
    files.write_json(out_dir / CONFIG_NAME, {"format_version": FORMAT_VERSION, **config})
    if peft is None:
        for stale in (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME):  # PEFT's files, or (the config) ours in an older folder
            (out_dir / stale).unlink(missing_ok=True)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    files.write_atomically(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))


def config_path(adapter_dir: str | Path) -> Path:
    """The file of an adapter folder that holds our config: llama_adapter_config.json, or an older folder's
    adapter_config.json."""
    folder = Path(adapter_dir)
    legacy = folder / LEGACY_CONFIG_NAME
    return legacy if legacy.is_file() and not (folder / CONFIG_NAME).is_file() else folder / CONFIG_NAME


def read_config(adapter_dir: str | Path) -> dict:
    """Our config of an adapter folder (`config_path`), its top-level shape checked."""
    path = config_path(adapter_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (is {adapter_dir} an adapter folder?)")
    saved = files.read_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(saved).__name__}")  # noqa: TRY004 - a bad file
    if "peft_type" in saved:  # PEFT's config alone: a folder PEFT wrote
        raise ValueError(
            f"{path}: a Hugging Face PEFT adapter ({saved['peft_type']}), not ours; PEFT's adaption prompts "
            "(LLaMA-Adapter v1) become ours with `llama-adapter convert --peft import`"
        )
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {saved.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    unexpected = sorted(set(saved) - TOP_LEVEL)
    if unexpected:
        raise ValueError(f"{path}: unexpected field(s) {', '.join(map(repr, unexpected))}")
    for key in ("adapter", "base"):
        if not isinstance(saved.get(key), dict):
            raise ValueError(f"{path}: field '{key}' is missing or not an object")  # noqa: TRY004 - a bad file
    if saved.get("template", "alpaca") not in TEMPLATES:
        raise ValueError(f"{path}: field 'template' must be one of {', '.join(TEMPLATES)}, got {saved['template']!r}")
    if not isinstance(saved["base"].get("name"), str):
        raise ValueError(f"{path}: field 'base': 'name' must be the base model's name or folder")  # noqa: TRY004
    return saved


def read_tensors(path: str | Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, checked against the names, shapes and kinds in `expected` (from the file's
    header, before any data is read) and then for values that are not finite, which would make every answer empty."""
    try:
        with safe_open(path, framework="pt") as handle:
            header = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118
            shapes = {name: list(tensor.get_shape()) for name, tensor in header.items()}
            kinds = {name: tensor.get_dtype() for name, tensor in header.items()}
        missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(
                f"{path}: missing tensors {sorted(missing)[:5]}, unexpected tensors {sorted(unexpected)[:5]}"
            )
        for name, param in expected.items():
            if shapes[name] != list(param.shape):
                raise ValueError(f"{path}: tensor {name} has shape {shapes[name]}, expected {list(param.shape)}")
            if kinds[name] not in FLOAT_KINDS:
                raise ValueError(f"{path}: tensor {name} holds {kinds[name]} values, expected floating point")
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"{path}: tensor {name} holds {bad:,} values that are not finite (NaN or infinity)")
    return tensors


FLOAT_KINDS = ("F64", "F32", "F16", "BF16")  # safetensors' names of the floating-point kinds torch loads


def usable_template(saved: dict, tokenizer, where: Path) -> str:
    """The prompt template the adapter was trained in (an adapter saved before templates were chosen: Alpaca's),
    refused where the base's tokenizer cannot render it."""
    template = saved.get("template", "alpaca")
    if template == "chat" and not tokenizer.chat_template:
        raise ValueError(f"{where}: trained in its base's chat template, which this base's tokenizer lacks")
    return template


def check_same_base(saved: dict, actual: dict, where: Path) -> None:
    """Refuse a base whose shape differs from the one the adapter was trained on; warn if only the name differs."""
    unexpected = sorted(saved.keys() - actual.keys())
    if unexpected:
        raise ValueError(f"{where}: field 'base': unexpected field(s) {', '.join(map(repr, unexpected))}")
    differences = [
        f"{key}: adapter has {saved.get(key)!r}, base has {actual[key]!r}"
        for key in actual
        if key != "name" and saved.get(key) != actual[key]
    ]
    if differences:
        raise ValueError(
            f"{where}: this adapter was trained on a different base model ({saved.get('name')!r}); "
            + "; ".join(differences)
        )
    if saved.get("name") != actual["name"]:
        warnings.warn(
            f"{where}: adapter was trained on {saved.get('name')!r}, loading onto {actual['name']!r} of the same shape",
            stacklevel=3,
        )
