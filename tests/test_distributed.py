"""Training in two processes (torchrun, gloo on the CPU) gives the adapter of the same run in one process.

The processes split every batch between them; with DDP (and FSDP sharding the base) the gradients are summed in
another order than in one process, so the adapters agree to float32 rounding, not bit for bit: measured, the
largest difference after 6 steps is below 1e-6; the tests allow 1e-5.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TRAINING_ROWS
from safetensors.torch import load_file
from test_resume import adapter_tensors, assert_same_tensors, losses

from llama_adapter import AdapterConfig, cli
from llama_adapter.adapter_files import WEIGHTS_NAME
from llama_adapter.config import BaseModelConfig, DistributedConfig
from llama_adapter.train import checkpoint, distributed
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.distributed import World
from llama_adapter.train.loop import train

# 17 rows: 4 held out, 13 to train on in batches of 3, so the last batch of each epoch has a single row and one of
# the two processes gets none of it.
ROWS = [*TRAINING_ROWS, {"instruction": "Repeat the word plum.", "input": "", "output": "plum plum plum"}]
FLAGS = {
    "epochs": 2,
    "batch_size": 3,
    "grad_accum": 2,
    "lr": 0.05,
    "val_fraction": 0.25,
    "warmup": 0.2,
    "save_every": 1,
    "seed": 3,
}
ADAPTER = AdapterConfig(adapter_len=3, adapter_layers=2)


def test_each_process_takes_every_nth_row_and_none_is_left_idle():
    rows = list("abcdefg")
    assert distributed.share(rows, World(0, 3, torch.device("cpu"))) == (["a", "d", "g"], True)
    assert distributed.share(rows, World(2, 3, torch.device("cpu"))) == (["c", "f"], True)
    # A process with no row of its own still runs a pass (the others wait for its all-reduce); it weighs nothing.
    assert distributed.share(["a"], World(1, 2, torch.device("cpu"))) == (["a"], False)


def test_each_process_draws_from_a_stream_of_its_own():
    cpu = torch.device("cpu")
    distributed.seed(3, World(0, 2, cpu))
    first = torch.rand(4)
    distributed.seed(3, World(1, 2, cpu))
    second = torch.rand(4)
    distributed.seed(3, World(0, 2, cpu))
    assert torch.equal(torch.rand(4), first) and not torch.equal(first, second)


def test_a_single_process_needs_no_process_group(make_model):
    world = distributed.setup()
    assert (world.rank, world.size, world.main) == (0, 1, True)
    model = make_model()
    loss_fn = distributed.prepare(model, world, fsdp=True)  # nothing to shard or sync alone
    assert not isinstance(loss_fn, torch.nn.parallel.DistributedDataParallel)
    assert distributed.all_sum([1.5, 2.0], world) == [1.5, 2.0]


def test_the_launcher_passes_every_flag_but_nproc_to_the_processes():
    argv = ["train", "--nproc", "2", "--data", "d.json", "--nproc=4", "--fsdp", "--out", "o"]
    assert cli.without_option(argv, "--nproc") == ["train", "--data", "d.json", "--fsdp", "--out", "o"]
    with pytest.raises(ValueError, match="nproc must be >= 1"):
        DistributedConfig(nproc=0)


@pytest.fixture
def run_files(tiny_base_dir, tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(ROWS))
    return tiny_base_dir, rows


@pytest.fixture
def one_process(run_files, tmp_path):
    """The reference: the same run in this one process."""
    base, rows = run_files
    out = tmp_path / "one"
    torch.manual_seed(0)
    summary = train(TrainConfig(data=str(rows), out=str(out), model=BaseModelConfig(base=str(base)), **FLAGS), ADAPTER)
    return out, summary


def flags(base, rows, out) -> list[str]:
    named = {"base": base, "data": rows, "out": out, "adapter_len": 3, "adapter_layers": 2} | FLAGS
    return [item for key, value in named.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def train_losses(out) -> list[float]:
    with open(out / "metrics.csv", newline="") as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]]


def assert_same_run(out, reference) -> None:
    mine, theirs = load_file(out / WEIGHTS_NAME), load_file(reference / WEIGHTS_NAME)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-4)
    assert train_losses(out) == pytest.approx(train_losses(reference), abs=1e-5)
    assert len(train_losses(out)) == 2 * 3  # one row per step: only one process writes the log


@pytest.mark.slow
def test_two_processes_with_ddp_train_the_same_adapter_as_one(run_files, one_process, tmp_path, capfd):
    base, rows = run_files
    out = tmp_path / "two"
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--nproc", "2", *flags(base, rows, out)])
    printed = capfd.readouterr()
    assert done.value.code == 0, printed.err[-3000:]
    reference, expected = one_process
    assert_same_run(out, reference)
    summary = json.loads(printed.out[printed.out.index("{") :])  # one summary, from the main process
    assert summary["processes"] == 2 and summary["steps"] == expected["steps"] == 6
    assert summary["train_tokens"] == expected["train_tokens"]  # every row trained exactly once
    assert summary["val_loss_after"] == pytest.approx(expected["val_loss_after"], abs=1e-5)
    assert printed.err.count("epoch 2: validation loss") == 1
    assert [p.name for p in (out / checkpoint.FOLDER).iterdir()] == ["step-00000006"]


@pytest.mark.slow
def test_fsdp_under_torchrun_trains_the_same_adapter_and_only_rank_0_speaks(run_files, one_process, tmp_path):
    base, rows = run_files
    out, logs = tmp_path / "fsdp", tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["--log-dir", str(logs), "--redirects", "3", "-m", "llama_adapter.train", "--fsdp"]
    done = subprocess.run([*command, *flags(base, rows, out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, one_process[0])
    # torchrun keeps each process's output apart: the progress, the report and the summary come from rank 0 alone.
    output = {
        (rank, stream): next(logs.rglob(f"attempt_0/{rank}/{stream}.log")).read_text()
        for rank in (0, 1)
        for stream in ("stdout", "stderr")
    }
    summary = json.loads(output[0, "stdout"][output[0, "stdout"].index("{") :])
    assert summary["processes"] == 2 and "epoch 2: validation loss" in output[0, "stderr"]
    # Each process holds half of the decoder layers (nearly all of this model) and the rest whole.
    assert summary["weights_mib_per_process"] < 0.55 * one_process[1]["weights_mib_per_process"]
    assert output[1, "stdout"] == ""
    assert "train:" not in output[1, "stderr"] and "validation loss" not in output[1, "stderr"]


# ----------------------------------------------------------------------------------------------------------
# Randomness per process, and resuming it


DROPOUT_FLAGS = "--method lora --lora-rank 2 --lora-dropout 0.5 --epochs 5 --batch-size 3 --lr 0.01 --val-fraction 0.25"
DROPOUT_FLAGS += " --save-every 1 --seed 3"


def lora_dropout_command(base, rows, out) -> list[str]:
    """LoRA with dropout 0.5 in two processes, a checkpoint every step: 25 steps."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*torchrun, "-m", "llama_adapter.train", "--base", str(base), "--data", str(rows), "--out", str(out),
            *DROPOUT_FLAGS.split()]  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first found by their parent id in /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_exactly(tiny_base_dir, tmp_path):
    """Each process draws its own dropout masks and resumes its own random stream (R5)."""
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(ROWS))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    done = subprocess.run(
        lora_dropout_command(tiny_base_dir, rows, whole), env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(lora_dropout_command(tiny_base_dir, rows, killed), env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    while not (killed / checkpoint.FOLDER / "step-00000004").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint of step 4 came"
        time.sleep(0.005)
    for pid in [*descendants(process.pid), process.pid]:  # both training processes first, then torchrun
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.read_state(checkpoint.latest(killed))["progress"]["step"] < 25  # killed mid-run

    done = subprocess.run(
        lora_dropout_command(tiny_base_dir, rows, killed), env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming from" in done.stderr
    assert losses(killed) == losses(whole)
    assert_same_tensors(adapter_tensors(killed), adapter_tensors(whole))
