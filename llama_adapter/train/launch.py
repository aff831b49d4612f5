"""`train --nproc N`: the N processes of one run, started with torchrun, and what the user hears of them.

One process failing stops them all: the others then fail too, waiting for it in a collective call, and torchrun
reports every failure with its tracebacks. So `launch` runs torchrun's agent quiet in a process of its own, each
process started hands its failure over (`hand_over`) instead of printing it, and only the first one to fail is told,
in one line, by the command that launched them. Under a torchrun started by hand, rank 0 alone speaks, as before.

Only the agent's process imports torch here: every command asks this module whether its process speaks.
"""

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FAILURES = "LLAMA_ADAPTER_FAILURES"  # the folder where the processes `launch` starts hand over their failure
FIRST = "first"  # the file in it that the first failure makes, with its message


class ProcessFailed(Exception):
    """A process of the run failed; the message is the first failure's."""


def launched() -> bool:
    """Whether torchrun (or another launcher speaking its protocol) started this process."""
    return "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def speaks() -> bool:
    """Whether this process tells the user why it stopped: not one that `launch` started (the command that launched
    it does), and of those of a torchrun started by hand, rank 0 alone."""
    return not _from_launch() and is_main_process()


def hand_over(message: str) -> bool:
    """Hand this process's failure to the command that launched it, if `launch` did; whether it did.

    The first process to fail makes the file (a hard link: made whole, or not at all); the later ones, stopped by
    it, add nothing.
    """
    if not _from_launch():
        return False
    folder = os.environ[FAILURES]
    try:
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False) as written:
            written.write(message)
        os.link(written.name, Path(folder, FIRST))
    except OSError:  # another process failed first (or the launcher is gone): nothing to add
        pass
    return True


def _from_launch() -> bool:
    return launched() and FAILURES in os.environ


def launch(nproc: int, train_args: list[str]) -> int:
    """Run `llama-adapter train train_args` in `nproc` processes under torchrun; returns its exit status, or raises
    ProcessFailed with the first failing process's message."""
    with tempfile.TemporaryDirectory(prefix="llama-adapter-failures-") as folder:
        done = subprocess.run(
            [sys.executable, "-m", __name__, str(nproc), *train_args],
            env=os.environ | {FAILURES: folder},
            check=False,
        )
        first = Path(folder, FIRST)
        if first.is_file():
            raise ProcessFailed(first.read_text())
    return done.returncode


def too_many(nproc: int, cores: int, gpus: int) -> tuple[str, str] | None:
    """("error" or "warning", why) when `nproc` processes are more than this machine has room for; else None.

    A process per GPU: a GPU has no room for two (NCCL refuses them). CPU processes beyond the cores take turns.
    """
    if gpus and nproc > gpus:
        return "error", f"--nproc {nproc}: this machine has {gpus} GPU(s), and each process needs one of its own"
    if not gpus and nproc > cores:
        return "warning", (
            f"--nproc {nproc} is more processes than this machine's {cores} CPU core(s): they take turns, which is "
            f"slower than --nproc {cores}"
        )
    return None


def _agent(nproc: int, train_args: list[str]) -> int:
    """torchrun's agent, in the process `launch` starts: it starts the training processes and waits for them, and
    says nothing itself: neither its log nor its report of their failures (the first failure tells its own)."""
    import torch
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    problem = too_many(nproc, cores, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if problem is not None:
        print(f"llama-adapter train: {problem[0]}: {problem[1]}", file=sys.stderr)
        if problem[0] == "error":
            return 1
    logging.disable()  # torchrun's log, in this process alone: the processes it starts log as they would
    try:
        torchrun.run(
            torchrun.parse_args(
                ["--standalone", f"--nproc-per-node={nproc}", "-m", "llama_adapter", "train", *train_args]
            )
        )
    except ChildFailedError:
        return 1
    except SignalException as stopped:  # Ctrl-C: the command that launched the run says so
        return 128 + stopped.sigval
    return 0


if __name__ == "__main__":
    sys.exit(_agent(int(sys.argv[1]), sys.argv[2:]))
