"""What a training run reports: metrics.csv (written through, so a crash keeps it), loss.png, the summary, and the
rows it left out."""

import csv
import math
import sys
from collections import Counter
from pathlib import Path

from .. import files
from ..data import reading
from .distributed import World


class MetricsLog:
    """metrics.csv: one row per optimizer step and one per validation, written through so a crash keeps it.

    A resumed run keeps the rows its checkpoint had seen (`keep_rows`) and drops those written after it, which the
    run is about to write again. Only the main process writes (`enabled`); every process counts the rows.
    """

    FIELDS = ("step", "epoch", "lr", "train_loss", "val_loss", "tokens", "tokens_per_s", "elapsed_s")

    def __init__(self, path: Path, keep_rows: int = 0, enabled: bool = True):
        self.path, self.rows, self.enabled = path, keep_rows, enabled
        if not enabled:
            return
        kept = read_metrics(path)[:keep_rows] if keep_rows and path.exists() else []

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.FIELDS)
                writer.writeheader()
                writer.writerows(kept)

        files.write_atomically(path, write)

    def write(self, **values) -> None:
        self.rows += 1
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.FIELDS).writerow(values)


def read_metrics(metrics_csv: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv, each a dict of MetricsLog.FIELDS; a field a row does not log is ''."""
    with open(metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(metrics_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.write_atomically(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def run_summary(progress, elapsed: float, model, dropped: int, skipped, world: World) -> dict:
    """The summary a run prints and keeps in its last checkpoint."""
    return {
        "steps": progress.step,
        # None, not NaN, when nothing was held out: the summary is written as strict JSON.
        "val_loss_before": None if math.isnan(progress.val_loss_before) else progress.val_loss_before,
        "val_loss_after": None if math.isnan(progress.val_loss) else progress.val_loss,
        "train_tokens": progress.tokens,
        "padding_share": 1 - progress.tokens / progress.padded if progress.padded else math.nan,
        "tokens_per_s": progress.tokens / elapsed,
        "wall_time_s": elapsed,
        "trainable_parameters": model.num_trainable_parameters(),
        "dropped_rows": dropped,
        "skipped_rows": len(skipped or []),
        "processes": world.size,
    }


def report_left_out(world: World, skipped: reading.BadRows, total: int, dropped: int, max_len: int) -> None:
    """Say on stderr which rows the run leaves out and why, the reasons counted, the first few named."""
    if skipped:
        reasons = Counter(why for _, why in skipped)
        counted = "; ".join(f"{n} x {why}" for why, n in reasons.most_common())
        say(world, f"Skipped {len(skipped)} of {total} rows (--on-bad-row skip): {counted}")
        for where, why in skipped[:5]:
            say(world, f"  {where}: {why}")
    if dropped:
        say(world, f"Dropped {dropped} training rows that keep no response token within --max-len {max_len}")


def say(world: World, message: str) -> None:
    """A message on stderr, once: from the main process."""
    if world.main:
        print(message, file=sys.stderr)
