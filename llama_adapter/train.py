"""Fine-tune a LLaMA-Adapter on Alpaca-format instructions (the paper's recipe, scaled to the batch).

llama-adapter train --data alpaca.json --out runs/alpaca
python -m llama_adapter.train --data alpaca.json --out runs/alpaca
"""

import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from . import data, hf, scienceqa
from .config import PRECISIONS, AdapterConfig, ScienceQAConfig, VisualConfig, default_precision, option
from .hf import DEFAULT_BASE
from .model import LlamaAdapterModel
from .visual import FeatureCache

PAPER_BASE_LR = 9e-3  # the reference's --blr; lr = blr * effective batch / 256


@dataclass
class TrainConfig:
    """Fine-tuning: data, optimisation and output."""

    data: str = option(
        "alpaca: JSON list or JSONL file of {instruction, input, output[, image]}; scienceqa: its folder"
    )
    out: str = option("output folder for the adapter, metrics.csv and loss.png")
    task: Literal["alpaca", "scienceqa"] = option("what --data holds", "alpaca")
    cot: bool = option("scienceqa: train the answer followed by its lecture and solution (chain of thought)", False)
    base: str = option("base model: the embedded default, a Hugging Face folder or a hub name", DEFAULT_BASE)
    precision: Literal["fp32", "bf16"] | None = option(
        "weights and compute dtype (default: bf16 on a CUDA GPU, else fp32)", None
    )
    lr: float | None = option(
        f"peak learning rate (default: {PAPER_BASE_LR} x batch-size x grad-accum / 256, as the paper)", None
    )
    epochs: int = option("passes over the training rows", 5)
    batch_size: int = option("rows per forward pass", 4)
    grad_accum: int = option("forward passes per optimizer step", 1)
    max_steps: int | None = option("stop after this many optimizer steps (default: epochs' worth)", None)
    max_len: int = option("truncate prompt + response to this many tokens", 512)
    gradient_checkpointing: bool = option(
        "recompute each layer's activations in the backward pass: far less memory for long sequences, about a "
        "third more compute",
        False,
    )
    seed: int = option("seed for the split, the shuffling and the prompt initialisation", 0)
    val_fraction: float = option("share of rows held out for validation loss", 0.05)
    weight_decay: float = option("AdamW weight decay", 0.02)
    warmup: float = option("share of steps with linear warm-up before cosine decay (2 of 5 epochs in the paper)", 0.4)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        self.precision = self.precision or default_precision()
        self.lr = self.lr or PAPER_BASE_LR * self.batch_size * self.grad_accum / 256


def train(
    cfg: TrainConfig,
    adapter_cfg: AdapterConfig,
    model: LlamaAdapterModel | None = None,
    *,
    visual_cfg: VisualConfig | None = None,
    rows: list[dict] | None = None,
) -> dict:
    """Train, validating before the first step and after each epoch; returns a summary of the run.

    `model` defaults to `cfg.base` with a fresh adapter (multimodal if `visual_cfg` names a CLIP model); pass one
    to train an adapter you built yourself. `rows` default to the Alpaca rows of `cfg.data`.
    """
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    rows = rows if rows is not None else data.load_rows(cfg.data)
    check_images_exist(rows, cfg.data)
    train_rows, val_rows = data.split_rows(rows, cfg.val_fraction, cfg.seed)
    model = model or LlamaAdapterModel.from_base(cfg.base, adapter_cfg, PRECISIONS[cfg.precision], visual=visual_cfg)
    if cfg.gradient_checkpointing:
        hf.enable_gradient_checkpointing(model.base)
    cache = model.feature_cache()
    with_images = sum(1 for row in rows if row.get("image"))
    if with_images and not model.multimodal:
        print(
            f"{with_images} rows name an image; this text-only adapter ignores them (--clip-model uses them)",
            file=sys.stderr,
        )
    train_set, dropped = data.encode_all(model.tokenizer, train_rows, cfg.max_len)
    val_set, _ = data.encode_all(model.tokenizer, val_rows, cfg.max_len)
    if not train_set:
        raise data.DataError(f"{cfg.data}: every training row's prompt is longer than max_len {cfg.max_len}")
    if dropped:
        print(f"Dropped {dropped} training rows whose prompt alone fills max_len {cfg.max_len}", file=sys.stderr)

    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum))
    total_steps = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)
    params = list(model.adapter_state().values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup))
    pad_id = model.tokenizer.pad_token_id

    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(
        json.dumps({"train": dataclasses.asdict(cfg), "adapter": dataclasses.asdict(model.config)}, indent=2)
    )
    log = MetricsLog(out / "metrics.csv")
    val_before = evaluate(model, val_set, cfg.batch_size, pad_id, cache)
    log.write(step=0, epoch=0, val_loss=val_before)

    step, tokens, padded, started = 0, 0, 0, time.perf_counter()
    progress = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        batches = data.length_grouped_batches(train_set, cfg.batch_size, seed=cfg.seed + epoch)
        for first in range(0, len(batches), cfg.grad_accum):
            group = [
                make_batch([train_set[i] for i in b], pad_id, cache) for b in batches[first : first + cfg.grad_accum]
            ]
            loss = accumulate_gradients(model, group)
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += sum(int(b["attention_mask"].sum()) for b in group)
            padded += sum(b["attention_mask"].numel() for b in group)
            elapsed = time.perf_counter() - started
            log.write(
                step=step,
                epoch=epoch,
                lr=scheduler.get_last_lr()[0],
                train_loss=loss,
                tokens=tokens,
                tokens_per_s=tokens / elapsed,
                elapsed_s=elapsed,
            )
            progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:.0f}")
            progress.update()
            if step >= total_steps:
                break
        val_loss = evaluate(model, val_set, cfg.batch_size, pad_id, cache)
        log.write(step=step, epoch=epoch, val_loss=val_loss)
        progress.write(f"epoch {epoch}: validation loss {val_loss:.4f}", file=sys.stderr)
        model.save(out)
        plot_losses(log.path, out / "loss.png")
        if step >= total_steps:
            break
    progress.close()
    elapsed = time.perf_counter() - started
    return {
        "steps": step,
        "val_loss_before": val_before,
        "val_loss_after": val_loss,
        "train_tokens": tokens,
        "padding_share": 1 - tokens / padded,
        "tokens_per_s": tokens / elapsed,
        "wall_time_s": elapsed,
        "trainable_parameters": model.num_trainable_parameters(),
        "dropped_rows": dropped,
    }


def accumulate_gradients(model: LlamaAdapterModel, batches: list[dict]) -> float:
    """Backward over a group of batches, each weighted by its share of response tokens; returns the group loss."""
    device = model.device
    counts = [int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches]
    total_loss = 0.0
    for batch, count in zip(batches, counts):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model.loss(**batch) * (count / sum(counts))
        loss.backward()
        total_loss += loss.item()
    return total_loss


def load_task_rows(cfg: TrainConfig, sqa: ScienceQAConfig, visual: VisualConfig) -> list[dict]:
    """Training rows for `cfg.task`: Alpaca rows as they are, or ScienceQA's train split as Alpaca rows."""
    if cfg.task == "alpaca":
        return data.load_rows(cfg.data)
    # A text-only adapter never opens the image files, so it needs none of them.
    missing_images = sqa.missing_images if visual.clip_model else "text-only"
    problems, missing = scienceqa.load_problems(cfg.data, "train", sqa.problems, sqa.splits, missing_images)
    if missing and visual.clip_model:
        print(
            f"{missing} of {len(problems)} training problems lack their image file: trained without it", file=sys.stderr
        )
    return scienceqa.to_rows(problems, sqa.image_context, cfg.cot)


def check_images_exist(rows: list[dict], source: str) -> None:
    """Fail before training, not mid-epoch, when rows name image files that are not there."""
    missing = [row["image"] for row in rows if row.get("image") and not Path(row["image"]).is_file()]
    if missing:
        raise data.DataError(f"{source}: {len(missing)} rows name image files that do not exist, e.g. {missing[:3]}")


def make_batch(examples: list[data.Example], pad_id: int, cache: FeatureCache | None) -> dict[str, torch.Tensor]:
    """Padded token tensors, plus image features and a has_image mask when a multimodal adapter's rows have images."""
    batch = data.collate(examples, pad_id)
    return batch | cache.model_inputs([example.image for example in examples]) if cache else batch


@torch.no_grad()
def evaluate(
    model: LlamaAdapterModel,
    examples: list[data.Example],
    batch_size: int,
    pad_id: int,
    cache: FeatureCache | None = None,
) -> float:
    """Token-weighted mean response loss over `examples` (nan when there are none)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = make_batch([examples[i] for i in order[start : start + batch_size]], pad_id, cache)
        n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
        total += model.loss(**{k: v.to(model.device) for k, v in batch.items()}).item() * n
        count += n
    model.train(was_training)
    return total / count if count else math.nan


def warmup_cosine(total_steps: int, warmup: float):
    """LR multiplier: linear from 0 to 1 over the warm-up share of steps, then half a cosine down to 0."""
    warmup_steps = warmup * total_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class MetricsLog:
    """metrics.csv: one row per optimizer step and one per validation, written through so a crash keeps it."""

    FIELDS = ("step", "epoch", "lr", "train_loss", "val_loss", "tokens", "tokens_per_s", "elapsed_s")

    def __init__(self, path: Path):
        self.path = path
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(self.FIELDS)

    def write(self, **values) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(values)


def plot_losses(metrics_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
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
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from .cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
