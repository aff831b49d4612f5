"""The adapter folder: `adapter.safetensors` (the trained tensors, float32, nothing pickled) and `adapter_config.json`
(the method and its settings, the image encoder, and the shape of the base it was trained on)."""

import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import files

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
TOP_LEVEL = {"format_version", "adapter", "visual", "base", "trainable_parameters"}  # what `write` callers save


def write(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write both files of an adapter folder; each one is replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in tensors.items()}
    files.write_atomically(out_dir / WEIGHTS_NAME, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
    files.write_json(out_dir / CONFIG_NAME, {"format_version": FORMAT_VERSION, **config})


def read_config(adapter_dir: str | Path) -> dict:
    """The adapter_config.json of an adapter folder, its top-level shape checked."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (is {adapter_dir} an adapter folder?)")
    saved = files.read_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(saved).__name__}")  # noqa: TRY004 - a bad file
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {saved.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    unexpected = sorted(set(saved) - TOP_LEVEL)
    if unexpected:
        raise ValueError(f"{path}: unexpected field(s) {', '.join(map(repr, unexpected))}")
    for key in ("adapter", "base"):
        if not isinstance(saved.get(key), dict):
            raise ValueError(f"{path}: field '{key}' is missing or not an object")  # noqa: TRY004 - a bad file
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
