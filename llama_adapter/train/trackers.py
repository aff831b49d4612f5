"""Experiment trackers (--report-to): TensorBoard's event files in <out>/tensorboard, or a Weights & Biases run in
<out>/wandb. Only the main process reports; the packages are imported only when asked for.

A resumed run goes on in the same log at the step after its checkpoint: TensorBoard is told to hide what the stopped
run logged after that checkpoint (its purge step), and Weights & Biases continues the run id kept in <out>/wandb.
"""

import importlib.util
import os
import secrets
import shutil
from pathlib import Path

from .. import files
from .config import TrainConfig
from .distributed import World

TENSORBOARD_FOLDER = "tensorboard"
WANDB_FOLDER = "wandb"
WANDB_RUN_ID = "run_id"  # in WANDB_FOLDER: the run a resumed run continues


def check_installed(report_to: str) -> None:
    """Refuse a tracker whose package is missing, before anything loads."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise ModuleNotFoundError(f"--report-to {report_to} needs {report_to}: pip install {report_to}")


class Tracker:
    """Reports nothing: --report-to none, and every process but the main one. The others log through `_log`."""

    def __init__(self, logging_steps: int = 1):
        self.logging_steps = logging_steps

    def log_train(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """A training step's values (those metrics.csv has), every --logging-steps steps."""
        if step % self.logging_steps == 0:
            self._log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s}, step)

    def log_validation(self, step: int, loss: float) -> None:
        self._log({"val/loss": loss}, step)

    def _log(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self, failed: bool) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=error is not None)


class TensorBoard(Tracker):
    def __init__(self, folder: Path, logging_steps: int, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(logging_steps)
        if resumed_at is None:  # a new run: an earlier run's curves in this folder would pass for this one's
            shutil.rmtree(folder, ignore_errors=True)
        # Events of steps after the checkpoint, which the run is about to log again, are hidden from then on.
        self.writer = SummaryWriter(str(folder), purge_step=None if resumed_at is None else resumed_at + 1)

    def _log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a crash keeps what was logged, as it keeps metrics.csv

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB(Tracker):
    def __init__(self, out: Path, logging_steps: int, resumed_at: int | None, config: dict):
        import wandb

        super().__init__(logging_steps)
        id_file = out / WANDB_FOLDER / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if resumed_at is not None and id_file.exists() else secrets.token_hex(4)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(id_file, run_id)
        # Offline unless the user asked for a mode or gave a key: a run never waits on the network or on a login
        # prompt. `wandb sync <out>/wandb/offline-run-*` uploads an offline run later.
        asked = "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "llama-adapter"), dir=str(out), id=run_id, resume="allow",
            name=out.resolve().name, config=config, mode=None if asked else "offline",
        )  # fmt: skip

    def _log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_tracker(cfg: TrainConfig, world: World, resumed_at: int | None, settings: dict) -> Tracker:
    """The tracker --report-to names, going on after step `resumed_at` of a resumed run (None: a new run)."""
    if not world.main or cfg.report_to == "none":
        return Tracker()
    if cfg.report_to == "tensorboard":
        return TensorBoard(Path(cfg.out) / TENSORBOARD_FOLDER, cfg.logging_steps, resumed_at)
    return WandB(Path(cfg.out), cfg.logging_steps, resumed_at, settings)
