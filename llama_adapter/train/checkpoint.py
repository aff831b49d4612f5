"""Training checkpoints: all a stopped run needs to go on exactly where it was, never read half-written.

`<out>/checkpoints/step-<N>/` holds
  adapter.safetensors, llama_adapter_config.json
                                             the adapter after step N: an adapter folder every command can load
  trainer_state.safetensors                  AdamW's moments and step counts by parameter name, and the RNG states
                                             of every process (rank 0's as rng.torch, rank r's as rng.torch.rank<r>)
  trainer_state.json                         the position in the data, the counters, the LR schedule, the settings,
                                             the training data's content hash
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

from .. import files
from ..adapter_files import WEIGHTS_NAME
from . import distributed

FOLDER = "checkpoints"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
_STEP = re.compile(r"step-(\d+)")
_OPTIMIZER = "optimizer."
_RNG = "rng."
# Checkpoints before this key paired the optimizer's state with the adapter's parameters by position: right only
# while the optimizer held them in `adapter_state()`'s order, which V2's second group (its undecayed scales) broke.
# Such a state is read back the way it was written.
_KEYED = "optimizer_state_by"


def save(
    out: str | os.PathLike,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    rng: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the checkpoint of step `state["progress"]["step"]` under `out`; returns its folder.

    `state` is JSON: the position in the data, counters and settings; the scheduler's state is added here. `rng`:
    each process's generator states by rank (distributed.rng_states); default, this process's as rank 0.
    """
    root = Path(out) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['progress']['step']:08d}"
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        model.save(staging)
        tensors, groups = _optimizer_tensors(optimizer, _names_in_optimizer(optimizer, model))
        save_file(tensors | _rng_tensors(rng), staging / STATE_TENSORS)
        full_state = state | {"scheduler": scheduler.state_dict(), "optimizer_param_groups": groups, _KEYED: "name"}
        (staging / STATE_JSON).write_text(json.dumps(full_state, indent=2) + "\n")
        for file in staging.iterdir():
            files.fsync(file)
        staging.rename(final)  # atomic: step-<N> appears whole or not at all
        files.fsync(root)
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
    if not path.is_file():
        raise ValueError(f"{path}: missing: {folder} is not a complete checkpoint")
    return files.read_json(path)


def restore(folder: Path, model, optimizer: torch.optim.Optimizer, scheduler, rank: int = 0) -> dict:
    """Put the adapter, the optimizer, the LR schedule and process `rank`'s RNG states back as they were; returns the
    state. A rank the checkpoint has no states for (a run resumed in more processes) keeps its fresh seeding."""
    state = read_state(folder)
    path = folder / STATE_TENSORS
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    model.load_adapter_weights(folder / WEIGHTS_NAME)
    names = _names_in_optimizer(optimizer, model) if state.get(_KEYED) == "name" else list(model.adapter_state())
    optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer_param_groups"], names, path))
    scheduler.load_state_dict(state["scheduler"])
    if _rng_key("torch", rank) in tensors:
        torch.set_rng_state(tensors[_rng_key("torch", rank)])
    if torch.cuda.is_available() and _rng_key("cuda", rank) in tensors:
        torch.cuda.set_rng_state(tensors[_rng_key("cuda", rank)])
    return state


def _names_in_optimizer(optimizer: torch.optim.Optimizer, model) -> list[str]:
    """The adapter's name of each parameter the optimizer holds, in the order its state_dict numbers them."""
    name_of = {id(param): name for name, param in model.adapter_state().items()}
    return [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list[dict]]:
    """The optimizer's per-parameter tensors as 'optimizer.<parameter name>.<key>', and its groups as JSON; `names`
    are the parameters' in the optimizer's order."""
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


def _rng_tensors(states: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
    states = states or distributed.rng_states(distributed.World(0, 1, torch.device("cpu")))  # this process alone
    return {_rng_key(kind, rank): state for rank, by_kind in enumerate(states) for kind, state in by_kind.items()}


def _rng_key(kind: str, rank: int) -> str:
    return f"{_RNG}{kind}" if rank == 0 else f"{_RNG}{kind}.rank{rank}"
