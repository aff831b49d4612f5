"""Training in several processes with PyTorch's own stack: torchrun starts them, DDP keeps the adapter in sync, and
FSDP (optional) shards the frozen base across them.

Every process reads the same rows and builds the same batches from the same seed; each takes every N-th row of
every batch (N processes), and every response token weighs the same in the loss whichever process holds it. So the
global batch, the learning rate and the order of the data are exactly those of the same run in one process, and
the adapter comes out the same up to floating-point summation order. How the processes are started, and what the
user hears of their failures: launch.py.
"""

import itertools
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..base import structure
from ..config import default_device
from .launch import launched


@dataclass(frozen=True)
class World:
    """This process's place among those training together; a plain process is a world of one."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Only the main process writes checkpoints, logs and progress."""
        return self.rank == 0


def setup() -> World:
    """Join the process group torchrun started: NCCL on GPUs (one per process), gloo on CPUs."""
    if not launched():
        return World(0, 1, default_device())
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def seed(seed: int, world: World) -> None:
    """Seed this process's random stream by the run's seed and its rank, so processes draw different dropout masks."""
    torch.manual_seed(seed * 1_000_003 + world.rank)


def rng_states(world: World) -> list[dict[str, torch.Tensor]]:
    """Every process's random-number generator states, by rank: a collective call, which every process makes."""
    local = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        local["cuda"] = torch.cuda.get_rng_state()
    if world.size == 1:
        return [local]
    gathered = [{} for _ in range(world.size)]
    for kind, state in local.items():
        parts = [torch.empty_like(state, device=world.device) for _ in range(world.size)]
        dist.all_gather(parts, state.to(world.device))
        for rank, part in enumerate(parts):
            gathered[rank][kind] = part.cpu()
    return gathered


@contextmanager
def main_first(world: World):
    """The main process runs the block before the others do: it fills caches (the converted default model, image
    features) that the others then read instead of writing them at the same time."""
    if not world.main:
        dist.barrier()
    yield
    if world.main and world.size > 1:
        dist.barrier()


def prepare(model, world: World, fsdp: bool, eos_weight: float = 1.0) -> nn.Module:
    """The module a training step calls with a batch to get its loss (`model.loss` with `eos_weight`): DDP around
    it in a world of several processes.

    DDP all-reduces the gradients of the parameters that require them: the adapter's. It does not broadcast the
    model at the start (that would send the whole frozen base over the network); every process builds the same
    model from the same seed and files, and the adapter alone is broadcast once here to be sure.
    With `fsdp`, the model comes in on the CPU (see `load_device`): FSDP moves each decoder layer to this process's
    device and keeps only its shard there, one layer at a time, so no device ever holds the whole base; the rest
    (the vocabulary projection, the adapter, an image encoder) follows whole.
    """
    loss = _Loss(model, eos_weight)
    if world.size == 1:
        return loss
    trainable = list(model.adapter_state().values())
    if fsdp:
        for layer in structure.decoder_layers(model.base):
            fully_shard(layer, ignored_params=set(trainable))
        fully_shard(structure.decoder(model.base), ignored_params=set(trainable))
        _move_unsharded(model, world.device)
    with torch.no_grad():
        for param in trainable:
            dist.broadcast(param, src=0)
    return DistributedDataParallel(
        loss,
        device_ids=[world.device.index] if world.device.type == "cuda" else None,
        init_sync=False,
        forward_sync_buffers=False,  # the base's buffers (rotary tables) are the same everywhere and never change
        find_unused_parameters=model.multimodal,  # the image projection gets no gradient from a batch without images
    )


def load_device(world: World, fsdp: bool) -> torch.device:
    """Where to load the model: the CPU when FSDP is to shard it onto the devices, else this process's device."""
    return torch.device("cpu") if fsdp and world.size > 1 else world.device


def _move_unsharded(model: nn.Module, device: torch.device) -> None:
    """Move what FSDP left whole to `device`, in place, so parameters keep their identity."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if not isinstance(tensor, DTensor) and tensor.device != device:
                tensor.data = tensor.data.to(device)


class _Loss(nn.Module):
    """model.loss as a module's forward, the call DDP intercepts to prepare its gradient all-reduce."""

    def __init__(self, model, eos_weight: float):
        super().__init__()
        self.model, self.eos_weight = model, eos_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(**batch, eos_weight=self.eos_weight)


def gradient_sync(module: nn.Module, now: bool):
    """Within this block, backward all-reduces gradients only if `now`: the last batch of a step does, the rest of
    an accumulation group just adds to the local gradients."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) and not now else nullcontext()


def share(rows: list, world: World) -> tuple[list, bool]:
    """This process's rows of a batch -- every world.size-th from its rank on -- and whether they count.

    A process left with none (a last batch smaller than the world) runs the batch's first row with weight zero:
    every process must run the same forward and backward passes, which DDP's all-reduce and FSDP's all-gathers wait
    for.
    """
    mine = rows[world.rank :: world.size]
    return (mine, True) if mine else (rows[:1], False)


def weights_mib(model: nn.Module) -> float:
    """The memory this process holds for the model's parameters: its shards of what FSDP shards, the rest whole."""
    local = (param.to_local() if isinstance(param, DTensor) else param for param in model.parameters())
    return sum(tensor.nbytes for tensor in local) / 2**20


def all_sum(values: list[float], world: World) -> list[float]:
    """Each value summed over the processes."""
    if world.size == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(total)
    return total.tolist()


def finish(world: World) -> None:
    """Wait for every process, then leave the group (a process that left early would abort the others' last call)."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
