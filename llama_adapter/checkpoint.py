"""Training checkpoints: all a stopped run needs to go on exactly where it was, never read half-written.

`<out>/checkpoints/step-<N>/` holds
  adapter.safetensors, adapter_config.json   the adapter after step N: an adapter folder every command can load
  trainer_state.safetensors                  AdamW's moments and step counts by parameter name, the RNG states
  trainer_state.json                         the position in the data, the counters, the LR schedule, the settings
A checkpoint is written into a temporary folder, every file is flushed to disk, and only then is the folder renamed
to `step-<N>`: a crash leaves at most a temporary folder, which is never read and is removed by the next save. Once a
new checkpoint is in place the older ones are removed. Nothing is pickled.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import WEIGHTS_NAME

FOLDER = "checkpoints"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
_STEP = re.compile(r"step-(\d+)")
_OPTIMIZER = "optimizer."
_RNG = "rng."


def save(out: str | os.PathLike, model, optimizer: torch.optim.Optimizer, scheduler, state: dict) -> Path:
    """Write the checkpoint of step `state["progress"]["step"]` under `out`; returns its folder.

    `state` is JSON: the position in the data, counters and settings; the scheduler's state is added here.
    """
    root = Path(out) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['progress']['step']:08d}"
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        model.save(staging)
        tensors, groups = _optimizer_tensors(optimizer, list(model.adapter_state()))
        save_file(tensors | _rng_tensors(), staging / STATE_TENSORS)
        full_state = state | {"scheduler": scheduler.state_dict(), "optimizer_param_groups": groups}
        (staging / STATE_JSON).write_text(json.dumps(full_state, indent=2) + "\n")
        for file in staging.iterdir():
            _fsync(file)
        staging.rename(final)  # atomic: step-<N> appears whole or not at all
        _fsync(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for other in root.iterdir():  # older checkpoints, and temporaries of saves a crash interrupted
        if other != final:
            shutil.rmtree(other, ignore_errors=True)
    return final


def latest(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `out`, if any."""
    root = Path(out) / FOLDER
    steps = [(int(m.group(1)), path) for path in root.glob("step-*") if (m := _STEP.fullmatch(path.name))]
    return max(steps)[1] if steps else None


def read_state(folder: Path) -> dict:
    """The JSON part of a checkpoint: cheap to read before deciding to resume."""
    path = folder / STATE_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing: {folder} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def restore(folder: Path, model, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Put the adapter, the optimizer, the LR schedule and the RNG states back as they were; returns the state."""
    state = read_state(folder)
    path = folder / STATE_TENSORS
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    model.load_adapter_weights(folder / WEIGHTS_NAME)
    names = list(model.adapter_state())
    optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer_param_groups"], names, path))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors[_RNG + "torch"])
    if torch.cuda.is_available() and _RNG + "cuda" in tensors:
        torch.cuda.set_rng_state(tensors[_RNG + "cuda"])
    return state


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list[dict]]:
    """The optimizer's per-parameter tensors as 'optimizer.<parameter name>.<key>', and its groups as JSON."""
    saved = optimizer.state_dict()
    tensors = {
        f"{_OPTIMIZER}{names[index]}.{key}": value.detach().cpu().contiguous()
        for index, per_param in saved["state"].items()
        for key, value in per_param.items()
    }
    return tensors, saved["param_groups"]


def _optimizer_state(tensors: dict, groups: list[dict], names: list[str], where: Path) -> dict:
    state: dict[int, dict] = {}
    index = {name: i for i, name in enumerate(names)}
    for key, value in tensors.items():
        if not key.startswith(_OPTIMIZER):
            continue
        name, field = key.removeprefix(_OPTIMIZER).rsplit(".", 1)
        if name not in index:
            raise ValueError(f"{where}: optimizer state for {name!r}, which this adapter does not have")
        state.setdefault(index[name], {})[field] = value
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    rng = {_RNG + "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng[_RNG + "cuda"] = torch.cuda.get_rng_state()
    return rng


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk, so the rename that follows never publishes unwritten data."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
