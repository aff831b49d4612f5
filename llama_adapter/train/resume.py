"""Going on from a checkpoint: only with the settings and data it was made with; settings added or renamed
since a checkpoint was written read as they were then."""

from pathlib import Path

from . import checkpoint
from .config import TrainConfig

# Settings a resumed run may change: none of them changes what is computed. What a run reports is among them, as
# validation leaves the training as it is.
REPORTING = ("eval_steps", "report_to", "logging_steps")
RESUMABLE_CHANGES = ("out", "resume", "save_every", "gradient_checkpointing", *REPORTING)

# Settings added after runs began saving theirs, with the value every run before them had.
# ("auto" chose Alpaca's template for all the data earlier runs could read.)
SETTINGS_ADDED = {
    "eos_weight": 1.0, "image_data": None, "image_ratio": 1.0, "extra_train": [], "answer_form": "letter",
    "template": "auto",
}  # fmt: skip

# Settings renamed since: the old name, the new one, and what each old value reads as now.
SETTINGS_RENAMED = {"cot": ("explanation", {False: "none", True: "after"})}


def settings_of_today(saved: dict) -> dict:
    """A checkpoint's saved settings in today's names, with every setting added since at the value it had then."""
    saved = dict(saved)
    for old, (new, values) in SETTINGS_RENAMED.items():
        if old in saved:
            saved[new] = values[saved.pop(old)]
    return SETTINGS_ADDED | saved


def find_resume_point(cfg: TrainConfig, settings: dict) -> Path | None:
    """The checkpoint to go on from: the newest in cfg.out, if resuming and it was made with the same settings."""
    last = checkpoint.latest(cfg.out)
    if last is None or not cfg.resume:
        return None
    before = settings_of_today(checkpoint.read_state(last)["settings"])
    changed = {
        key: (before.get(key), value)
        for key, value in settings.items()
        if key not in RESUMABLE_CHANGES and before.get(key) != value
    }
    if changed:
        raise ValueError(
            f"{last}: made with other settings {changed} (then, now): resuming would not continue that run; "
            "use the same settings, another --out, or --no-resume to start over"
        )
    return last


def check_same_data(state: dict, resume_from: Path, data_hash: str, source: str) -> None:
    """Refuse to resume on training data whose content differs from the data the checkpoint (`state`) was trained on."""
    before = state.get("data_sha256", data_hash)  # checkpoints made before the hash was kept have none
    if before != data_hash:
        raise ValueError(
            f"{source}: the training data changed since {resume_from} was made (content hash {before[:12]}, now "
            f"{data_hash[:12]}): resuming would not continue that run; restore the data, or use --no-resume"
        )
