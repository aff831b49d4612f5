"""Experiment tracking and validation a user can watch: TensorBoard and Weights & Biases get the training values
every --logging-steps steps and every validation loss, a resumed run goes on in the same log without repeating a
step, --eval-steps validates in between, and validation shows its own progress bar."""

import csv
import dataclasses
import importlib.util
import json
import re
import time

import pytest
import torch
from safetensors.torch import load_file
from test_resume import Crash, crash_at_step

from llama_adapter import cli
from llama_adapter.adapter_files import WEIGHTS_NAME
from llama_adapter.train import loop, trackers
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train


def config(rows_file, out, **overrides) -> TrainConfig:
    """2 epochs of 6 steps (12 training rows, batch 2; 4 rows held out), a checkpoint every 3 steps."""
    settings = dict(data=str(rows_file), out=str(out), epochs=2, batch_size=2, lr=0.05, val_fraction=0.25, save_every=3)
    return TrainConfig(**(settings | overrides))


def metrics(out) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def csv_values(out, column: str) -> dict[int, float]:
    return {int(row["step"]): float(row[column]) for row in metrics(out) if row[column]}


def tensorboard_scalars(out) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) events, as TensorBoard reads the run folder (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / trackers.TENSORBOARD_FOLDER))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_training_values_every_logging_steps_and_every_validation(make_model, rows_file, tmp_path):
    out = tmp_path / "run"
    cfg = config(rows_file, out, report_to="tensorboard", logging_steps=4, eval_steps=4)
    train(cfg, make_model().config, make_model())
    scalars = tensorboard_scalars(out)

    assert set(scalars) == {"train/loss", "train/lr", "train/tokens_per_s", "val/loss"}
    for tag, column in [("train/loss", "train_loss"), ("train/lr", "lr"), ("train/tokens_per_s", "tokens_per_s")]:
        logged = csv_values(out, column)
        assert [step for step, _ in scalars[tag]] == [4, 8, 12], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([logged[s] for s in (4, 8, 12)], rel=1e-6)
    # Before the first step, every --eval-steps steps, and at each epoch's end (6 and 12), each step once.
    validated = csv_values(out, "val_loss")
    assert [step for step, _ in scalars["val/loss"]] == [0, 4, 6, 8, 12] == list(validated)
    assert [value for _, value in scalars["val/loss"]] == pytest.approx(list(validated.values()), rel=1e-6)


def test_eval_steps_adds_validations_and_changes_nothing_trained_and_none_reports_nothing(
    make_model, rows_file, tmp_path
):
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    train(config(rows_file, plain), make_model().config, make_model())
    train(config(rows_file, evaluated, eval_steps=2), make_model().config, make_model())

    assert list(csv_values(plain, "val_loss")) == [0, 6, 12]  # today's validations: before, and each epoch's end
    assert list(csv_values(evaluated, "val_loss")) == [0, 2, 4, 6, 8, 10, 12]
    assert csv_values(plain, "train_loss") == csv_values(evaluated, "train_loss")
    trained, also_trained = load_file(plain / WEIGHTS_NAME), load_file(evaluated / WEIGHTS_NAME)
    assert all(torch.equal(tensor, also_trained[name]) for name, tensor in trained.items())
    # --report-to none (the default) leaves no tracker folder behind.
    assert not {trackers.TENSORBOARD_FOLDER, trackers.WANDB_FOLDER} & {p.name for p in plain.iterdir()}


def test_a_resumed_run_goes_on_in_the_same_tensorboard_log_without_repeating_a_step(
    make_model, rows_file, tmp_path, monkeypatch
):
    """Stopped at step 5, after logging step 4 past its checkpoint at 3: the resumed run logs 4 again, and TensorBoard
    shows it once. What a run reports may change on resuming: here the resumed run logs every 2 steps."""
    out = tmp_path / "run"
    cfg = config(rows_file, out, report_to="tensorboard", logging_steps=1, eval_steps=4)
    crash_at_step(monkeypatch, 5)
    with pytest.raises(Crash):
        train(cfg, make_model().config, make_model())
    monkeypatch.undo()
    assert [step for step, _ in tensorboard_scalars(out)["train/loss"]] == [1, 2, 3, 4]
    resumed = dataclasses.replace(cfg, logging_steps=2)
    assert train(resumed, make_model().config, make_model())["resumed_from_step"] == 3

    scalars = tensorboard_scalars(out)
    assert len(list((out / trackers.TENSORBOARD_FOLDER).glob("events.out.tfevents.*"))) == 2  # one log, two writers
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 6, 8, 10, 12]
    assert [step for step, _ in scalars["val/loss"]] == [0, 4, 6, 8, 12]
    logged = csv_values(out, "train_loss")
    assert [value for _, value in scalars["train/loss"]] == pytest.approx(
        [logged[s] for s in (1, 2, 3, 4, 6, 8, 10, 12)]
    )


def test_a_new_run_in_the_same_folder_starts_a_new_tensorboard_log(make_model, rows_file, tmp_path):
    out = tmp_path / "run"
    train(config(rows_file, out, report_to="tensorboard", max_steps=4), make_model().config, make_model())
    cfg = config(rows_file, out, report_to="tensorboard", max_steps=2, logging_steps=1, resume=False)
    train(cfg, make_model().config, make_model())
    assert [step for step, _ in tensorboard_scalars(out)["val/loss"]] == [0, 2]


def wandb_records(run_file) -> list:
    """The records of an offline run's .wandb file: a LevelDB log (blocks of 32 KiB; a record's pieces each with a
    7-byte header: checksum, length, kind) after W&B's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pieces, at = [], b"", 7
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        length, kind = int.from_bytes(data[at + 4 : at + 6], "little"), data[at + 6]
        pieces += data[at + 7 : at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # the whole record, or its last piece
            records.append(wandb_internal_pb2.Record.FromString(pieces))
            pieces = b""
    return records


def wandb_history(out) -> tuple[set[str], dict[str, dict[int, float]]]:
    """The run ids of every offline run under <out>/wandb, and each key's value by step, all runs together."""
    ids, history = set(), {}
    for run_file in sorted((out / trackers.WANDB_FOLDER).glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        steps = history.setdefault(key, {})
                        assert record.history.step.num not in steps, (key, record.history.step.num)
                        steps[record.history.step.num] = json.loads(item.value_json)
    return ids, history


def test_wandb_logs_offline_without_a_network_and_a_resumed_run_continues_the_same_run(
    make_model, rows_file, tmp_path, monkeypatch
):
    for variable in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    out = tmp_path / "run"
    cfg = config(rows_file, out, report_to="wandb", logging_steps=2, max_steps=6, save_every=2)
    real_step = loop.train_step
    crash_at_step(monkeypatch, 3)
    with pytest.raises(Crash):
        train(cfg, make_model().config, make_model())
    monkeypatch.setattr(loop, "train_step", real_step)  # not undo(): the environment above stays
    time.sleep(1 - time.time() % 1)  # W&B names an offline run's folder by the second it began
    assert train(cfg, make_model().config, make_model())["resumed_from_step"] == 2

    ids, history = wandb_history(out)
    assert ids == {(out / trackers.WANDB_FOLDER / trackers.WANDB_RUN_ID).read_text()}
    assert len(list((out / trackers.WANDB_FOLDER).glob("offline-run-*"))) == 2
    assert history["train/loss"] == pytest.approx({s: csv_values(out, "train_loss")[s] for s in (2, 4, 6)})
    assert history["val/loss"] == pytest.approx(csv_values(out, "val_loss"))
    assert set(history["train/lr"]) == set(history["train/tokens_per_s"]) == {2, 4, 6}


def test_a_missing_tracker_package_is_named_in_one_line_before_any_work(
    monkeypatch, tiny_base_dir, rows_file, tmp_path
):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    argv = ["train", "--base", str(tiny_base_dir), "--data", str(rows_file), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit:
        cli.main([*argv, "--report-to", "tensorboard", "--max-steps", "1"])
    assert (
        exit.value.code
        == "llama-adapter train: error: --report-to tensorboard needs tensorboard: pip install tensorboard"
    )
    assert not (tmp_path / "run").exists()


def test_validation_shows_its_own_progress_bar(make_model, rows_file, tmp_path, capsys):
    train(config(rows_file, tmp_path / "run", max_steps=1), make_model().config, make_model())
    # Before the step and after it, a bar over the 2 batches of the 4 held-out rows.
    assert len(re.findall(r"validation: +0%\|[^|]*\| 0/2 ", capsys.readouterr().err)) == 2


def test_val_fraction_0_runs_no_validation_at_all(make_model, rows_file, tmp_path, capsys, monkeypatch):
    def no_validation(*args, **kwargs):
        raise AssertionError("validation ran without validation rows")

    monkeypatch.setattr(loop, "evaluate", no_validation)
    out = tmp_path / "run"
    train(config(rows_file, out, val_fraction=0.0, eval_steps=1, max_steps=3), make_model().config, make_model())
    assert not csv_values(out, "val_loss") and len(metrics(out)) == 3  # a row per step, none for validation
    assert "validation" not in capsys.readouterr().err
