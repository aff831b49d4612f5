"""Never lose work: checkpoints hold everything a run needs, a stopped run resumes exactly, nothing half-written is
read, and a non-finite loss stops the run with the last checkpoint intact."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from llama_adapter.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from llama_adapter.train import checkpoint, loop, optim
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import TrainingStopped, train
from llama_adapter.train.run_log import MetricsLog


def config(rows_file, out, **overrides) -> TrainConfig:
    """3 epochs of 3 steps (12 training rows, batch 2, 2 batches a step), a checkpoint every 2 steps."""
    settings = {
        "data": str(rows_file),
        "out": str(out),
        "epochs": 3,
        "batch_size": 2,
        "grad_accum": 2,
        "lr": 0.05,
        "val_fraction": 0.25,
        "warmup": 0.2,
        "save_every": 2,
    }
    return TrainConfig(**(settings | overrides))


def metrics(out) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def losses(out) -> list[tuple[str, str, str]]:
    """(step, train loss, validation loss) of every row, exactly as written."""
    return [(row["step"], row["train_loss"], row["val_loss"]) for row in metrics(out)]


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_NAME)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


class Crash(Exception):
    """Stands in for the process dying: raised from inside the training loop."""


def crash_at_step(monkeypatch, step: int) -> None:
    real = loop.train_step
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying)


def test_checkpoint_holds_adapter_optimizer_schedule_rng_and_position(make_model, rows_file, tmp_path):
    model = make_model()
    out = tmp_path / "run"
    train(config(rows_file, out, epochs=1, save_every=1, max_steps=2), model.config, model)
    folder = checkpoint.latest(out)
    assert folder.name == "step-00000002"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [WEIGHTS_NAME, CONFIG_NAME, checkpoint.STATE_TENSORS, checkpoint.STATE_JSON]
    )
    assert sorted(p.name for p in (out / checkpoint.FOLDER).iterdir()) == [folder.name]  # older ones removed
    state = checkpoint.read_state(folder)
    assert state["progress"] | {"elapsed_s": 0} == {
        "step": 2,
        "epoch": 2,
        "group": 0,
        "tokens": state["summary"]["train_tokens"],
        "padded": state["progress"]["padded"],
        "elapsed_s": 0,
        "image_steps": 0,
        "log_rows": 4,  # validation before, two steps, validation after
        "val_loss_before": state["summary"]["val_loss_before"],
        "val_loss": state["summary"]["val_loss_after"],
        "done": True,
    }
    assert state["scheduler"]["last_epoch"] == 2
    assert state["settings"]["lr"] == 0.05 and state["settings"]["adapter"] == {
        "adapter_len": 3,
        "adapter_layers": 2,
        "method": "llama-adapter",
    }
    tensors = load_file(folder / checkpoint.STATE_TENSORS)
    names = list(model.adapter_state())
    for name in names:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert f"optimizer.{name}.{key}" in tensors
    assert tensors[f"optimizer.{names[0]}.step"].item() == 2
    assert torch.equal(tensors["rng.torch"], torch.get_rng_state())
    # The checkpoint is also an adapter folder: the adapter the run ended with.
    assert_same_tensors(adapter_tensors(folder), adapter_tensors(out))


def test_restore_puts_back_adapter_optimizer_schedule_and_rng(make_model, randomize_adapter, tmp_path):
    model = make_model()
    params = list(model.adapter_state().values())
    optimizer = torch.optim.AdamW(params, lr=0.1, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.warmup_cosine(10, 0.2))
    for _ in range(3):
        sum(p.sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
    rng = torch.get_rng_state()
    folder = checkpoint.save(tmp_path, model, optimizer, scheduler, {"progress": {"step": 3}})
    expected = optimizer.state_dict()

    other = make_model()
    randomize_adapter(other, seed=3)
    torch.rand(5)  # the RNG moves on
    other_params = list(other.adapter_state().values())
    other_optimizer = torch.optim.AdamW(other_params, lr=0.1, betas=(0.9, 0.95))
    other_scheduler = torch.optim.lr_scheduler.LambdaLR(other_optimizer, optim.warmup_cosine(10, 0.2))
    assert checkpoint.restore(folder, other, other_optimizer, other_scheduler)["progress"] == {"step": 3}
    assert torch.equal(torch.get_rng_state(), rng)
    assert other_scheduler.get_last_lr() == scheduler.get_last_lr() and other_scheduler.last_epoch == 3
    restored = other_optimizer.state_dict()
    assert restored["param_groups"][0]["lr"] == expected["param_groups"][0]["lr"]
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)
    for mine, theirs in zip(params, other_params):
        assert torch.equal(mine, theirs)


def test_a_run_stopped_mid_epoch_resumes_exactly(make_model, randomize_adapter, rows_file, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(config(rows_file, whole), make_model().config, make_model())

    stopped = tmp_path / "stopped"
    crash_at_step(monkeypatch, 6)  # step 6: in epoch 2, after the checkpoint of step 4
    with pytest.raises(Crash):
        train(config(rows_file, stopped), make_model().config, make_model())
    assert checkpoint.latest(stopped).name == "step-00000004"
    assert len(metrics(stopped)) > 1 + 4 + 1  # rows after the checkpoint, which the resumed run must drop
    monkeypatch.undo()

    # Other prompts and gates in the fresh model prove that the adapter comes from the checkpoint.
    fresh = make_model()
    randomize_adapter(fresh, seed=7)
    summary = train(config(rows_file, stopped), fresh.config, fresh)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 9
    assert losses(stopped) == losses(whole)
    assert_same_tensors(adapter_tensors(stopped), adapter_tensors(whole))


def test_a_run_stopped_after_an_epoch_resumes_from_its_end(make_model, rows_file, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(config(rows_file, whole, save_every=100), make_model().config, make_model())
    stopped = tmp_path / "stopped"
    crash_at_step(monkeypatch, 5)
    with pytest.raises(Crash):
        train(config(rows_file, stopped, save_every=100), make_model().config, make_model())
    progress = checkpoint.read_state(checkpoint.latest(stopped))["progress"]
    assert (progress["step"], progress["epoch"], progress["group"]) == (3, 2, 0)  # epoch 1 done, validated
    monkeypatch.undo()
    train(config(rows_file, stopped, save_every=100), make_model().config, make_model())
    assert losses(stopped) == losses(whole)
    assert_same_tensors(adapter_tensors(stopped), adapter_tensors(whole))


def test_a_finished_run_is_not_trained_again(make_model, rows_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    summary = train(config(rows_file, out), make_model().config, make_model())
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: pytest.fail("trained again"))
    assert train(config(rows_file, out), make_model().config, make_model()) == summary
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_finished_run_hands_its_trained_adapter_to_the_model_passed_in(make_model, rows_file, tmp_path):
    """Calling train again on a finished run, with a fresh model, leaves that model as the run trained it: a script
    that trains and then uses its model gets the trained adapter whether the run just ran or had finished before."""
    out = tmp_path / "run"
    trained = make_model()
    train(config(rows_file, out), trained.config, trained)
    fresh = make_model()
    train(config(rows_file, out), fresh.config, fresh)
    assert_same_tensors(
        {name: p.detach() for name, p in fresh.adapter_state().items()},
        {name: p.detach() for name, p in trained.adapter_state().items()},
    )


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_that_settings_old_value(
    make_model, rows_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    crash_at_step(monkeypatch, 3)  # after the checkpoint of step 2
    with pytest.raises(Crash):
        train(config(rows_file, out), make_model().config, make_model())
    monkeypatch.undo()
    state_file = checkpoint.latest(out) / checkpoint.STATE_JSON
    state = json.loads(state_file.read_text())
    del state["settings"]["eos_weight"]  # as a checkpoint written before --eos-weight existed
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"made with other settings \{'eos_weight': \(1.0, 2.0\)\}"):
        train(config(rows_file, out, eos_weight=2.0), make_model().config, make_model())
    assert train(config(rows_file, out), make_model().config, make_model())["resumed_from_step"] == 2


def test_resuming_with_other_settings_is_refused_before_anything_is_written(make_model, rows_file, tmp_path):
    out = tmp_path / "run"
    train(config(rows_file, out, max_steps=2), make_model().config, make_model())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"step-00000002: made with other settings \{'lr': \(0.05, 0.1\)\}"):
        train(config(rows_file, out, max_steps=2, lr=0.1), make_model().config, make_model())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # What does not change the computation may change: a resumed run may checkpoint more or less often.
    train(config(rows_file, out, max_steps=2, save_every=1), make_model().config, make_model())


def test_resuming_on_edited_data_is_refused_naming_the_file(make_model, rows_file, tmp_path, monkeypatch):
    """A resumed run checks the content of its data, not only the path (R6)."""
    out = tmp_path / "run"
    crash_at_step(monkeypatch, 3)
    with pytest.raises(Crash):
        train(config(rows_file, out), make_model().config, make_model())
    monkeypatch.undo()
    rows = json.loads(rows_file.read_text())
    rows[0]["output"] = "edited"
    rows_file.write_text(json.dumps(rows))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=rf"{rows_file}.*changed"):
        train(config(rows_file, out), make_model().config, make_model())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_no_resume_starts_over(make_model, rows_file, tmp_path):
    out = tmp_path / "run"
    first = train(config(rows_file, out, max_steps=4), make_model().config, make_model())
    again = train(config(rows_file, out, max_steps=4, resume=False), make_model().config, make_model())
    assert again["resumed_from_step"] is None and again["steps"] == 4
    assert again["val_loss_after"] == first["val_loss_after"]
    assert [row["step"] for row in metrics(out)] == ["0", "1", "2", "3", "3", "4", "4"]


def test_a_half_written_checkpoint_is_never_read_and_is_cleaned_up(make_model, rows_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    crash_at_step(monkeypatch, 3)
    with pytest.raises(Crash):
        train(config(rows_file, out, save_every=1), make_model().config, make_model())
    monkeypatch.undo()
    # What a crash during a save leaves: a temporary folder with a torn file, under a name resuming never reads.
    torn = out / checkpoint.FOLDER / ".tmp-crashed"
    torn.mkdir()
    (torn / WEIGHTS_NAME).write_bytes(b"\x00" * 10)
    assert checkpoint.latest(out).name == "step-00000002"
    assert train(config(rows_file, out, save_every=1), make_model().config, make_model())["resumed_from_step"] == 2
    assert not torn.exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(make_model, rows_file, tmp_path):
    model = make_model()
    out = tmp_path / "run"
    calls = []

    def poison(module, args, output):  # the decoder's output turns NaN from the 13th forward pass (step 5) on
        calls.append(1)
        if len(calls) >= 13:
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    model.base.model.register_forward_hook(poison)
    with pytest.raises(TrainingStopped) as stopped:
        train(config(rows_file, out, save_every=1), model.config, model)
    message = str(stopped.value)
    last = checkpoint.latest(out)
    assert "training diverged" in message and f"the last good checkpoint, {last}, is intact" in message
    step = int(message.split(":")[0].removeprefix("step "))
    assert last.name == f"step-{step - 1:08d}"
    saved = adapter_tensors(last)
    assert all(torch.isfinite(t).all() for t in saved.values())
    # The stopped step never reached the weights: the model holds what the checkpoint holds.
    assert_same_tensors(saved, {n: p.detach() for n, p in model.adapter_state().items()})


def test_metrics_log_keeps_only_the_rows_a_checkpoint_had_seen(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path)
    for step in range(5):
        log.write(step=step, train_loss=1.0)
    resumed = MetricsLog(path, keep_rows=3)
    assert resumed.rows == 3 and [row["step"] for row in metrics(tmp_path)] == ["0", "1", "2"]
    resumed.write(step=3, train_loss=2.0)
    assert [row["train_loss"] for row in metrics(tmp_path)] == ["1.0", "1.0", "1.0", "2.0"]
    MetricsLog(tmp_path / "other.csv", enabled=False).write(step=0)
    assert not (tmp_path / "other.csv").exists()


# ----------------------------------------------------------------------------------------------------------
# The real thing: a training process killed with SIGKILL, then started again


def train_command(base, rows_file, out) -> list[str]:
    flags = "--epochs 5 --batch-size 2 --lr 0.05 --adapter-layers 2 --adapter-len 3 --val-fraction 0.25 --save-every 1"
    return [sys.executable, "-m", "llama_adapter.train", "--base", str(base), "--data", str(rows_file)] + [
        "--out",
        str(out),
        *flags.split(),
    ]


@pytest.mark.slow
def test_a_training_process_killed_mid_run_resumes_to_the_same_adapter(tiny_base_dir, rows_file, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the same kernels in every run, so the same bits
    whole = tmp_path / "whole"
    subprocess.run(train_command(tiny_base_dir, rows_file, whole), env=env, check=True, capture_output=True)
    steps = len([row for row in metrics(whole) if row["train_loss"]])
    assert steps == 5 * 6

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        train_command(tiny_base_dir, rows_file, killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (killed / checkpoint.FOLDER / "step-00000008").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint of step 8 came"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    reached = checkpoint.latest(killed)
    assert 8 <= checkpoint.read_state(reached)["progress"]["step"] < steps  # killed mid-run, not after it

    resumed = subprocess.run(
        train_command(tiny_base_dir, rows_file, killed), env=env, check=True, capture_output=True, text=True
    )
    assert f"Resuming from {reached}" in resumed.stderr
    assert losses(killed) == losses(whole)  # every step's loss, to the last digit written
    assert_same_tensors(adapter_tensors(killed), adapter_tensors(whole))
