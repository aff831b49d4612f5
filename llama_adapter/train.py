"""Fine-tune a LLaMA-Adapter on Alpaca-format instructions (the paper's recipe, scaled to the batch).

llama-adapter train --data alpaca.json --out runs/alpaca
python -m llama_adapter.train --data alpaca.json --out runs/alpaca
torchrun --nproc-per-node 2 -m llama_adapter.train --data alpaca.json --out runs/alpaca   (= train --nproc 2)

A run writes a checkpoint every --save-every steps and at the end of each epoch (checkpoint.py); started again with
the same --out it goes on from its last checkpoint exactly as if it had never stopped.
"""

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from . import checkpoint, data, distributed, hf, scienceqa
from .config import (
    PRECISIONS,
    QUANTIZE_HELP,
    AdapterConfig,
    Quantization,
    ScienceQAConfig,
    VisualConfig,
    check_quantize,
    default_precision,
    option,
)
from .distributed import World
from .hf import DEFAULT_BASE
from .model import LlamaAdapterModel
from .visual import FeatureCache

PAPER_BASE_LR = 9e-3  # the reference's --blr; lr = blr * effective batch / 256
# Settings a resumed run may change: none of them changes what is computed.
RESUMABLE_CHANGES = ("out", "resume", "save_every", "gradient_checkpointing")


class TrainingStopped(RuntimeError):
    """The run cannot go on (a loss that is not finite); what it saved before is intact."""


@dataclass
class TrainConfig:
    """Fine-tuning: data, optimisation and output."""

    data: str = option(
        "alpaca: JSON list or JSONL file of {instruction, input, output[, image]}; scienceqa: its folder"
    )
    out: str = option("output folder for the adapter, checkpoints, metrics.csv and loss.png")
    task: Literal["alpaca", "scienceqa"] = option("what --data holds", "alpaca")
    cot: bool = option("scienceqa: train the answer followed by its lecture and solution (chain of thought)", False)
    base: str = option("base model: the embedded default, a Hugging Face folder or a hub name", DEFAULT_BASE)
    precision: Literal["fp32", "bf16"] | None = option(
        "weights and compute dtype (default: bf16 on a CUDA GPU, else fp32)", None
    )
    quantize: Quantization = option(QUANTIZE_HELP, "none")
    lr: float | None = option(
        f"peak learning rate (default: {PAPER_BASE_LR} x batch-size x grad-accum / 256, as the paper; other methods "
        "want other rates: README, Other methods)",
        None,
    )
    epochs: int = option("passes over the training rows", 5)
    batch_size: int = option("rows per forward pass, over all processes together", 4)
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
    save_every: int = option("write a checkpoint every this many optimizer steps, besides each epoch's end", 50)
    resume: bool = option("go on from the last checkpoint in --out, if any (--no-resume starts over)", True)
    on_bad_row: Literal["error", "skip"] = option(
        "a bad data row (or image) stops the run naming it, or is left out and counted in the report", "error"
    )

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "max_len", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        self.precision = self.precision or default_precision()
        check_quantize(self.quantize)
        self.lr = self.lr or PAPER_BASE_LR * self.batch_size * self.grad_accum / 256


@dataclass
class Progress:
    """Where a run stands: saved in every checkpoint, and with the tensors all a resumed run needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch in progress, from 1
    group: int = 0  # optimizer steps done in that epoch: the position in its batches
    tokens: int = 0  # non-padding tokens trained, all processes together
    padded: int = 0  # batch positions, padding included
    elapsed_s: float = 0.0
    log_rows: int = 0  # rows in metrics.csv
    val_loss_before: float = math.nan
    val_loss: float = math.nan
    done: bool = False


def train(
    cfg: TrainConfig,
    adapter_cfg: AdapterConfig,
    model: LlamaAdapterModel | None = None,
    *,
    visual_cfg: VisualConfig | None = None,
    sqa_cfg: ScienceQAConfig | None = None,
    rows: list[dict] | None = None,
    fsdp: bool = False,
) -> dict:
    """Train, validating before the first step and after each epoch; returns a summary of the run.

    `model` defaults to `cfg.base` with a fresh adapter (multimodal if `visual_cfg` names a CLIP model); pass one
    to train an adapter you built yourself. `rows` default to those of `cfg.data`, read as `cfg.task` says.
    Under torchrun every process runs this and they train as one (distributed.py); `fsdp` shards the base.
    """
    if adapter_cfg.method in ("prefix", "ptuning-v2") and cfg.gradient_checkpointing:
        # The prefix rides in the KV cache, which each recomputed layer would extend a second time.
        raise ValueError(f"--gradient-checkpointing does not work with --method {adapter_cfg.method}")
    if cfg.quantize != "none" and fsdp:
        raise ValueError("--fsdp cannot shard a quantised base; use --quantize none, or DDP without --fsdp")
    world = distributed.setup()
    visual_cfg = visual_cfg or VisualConfig()
    settings = run_settings(cfg, adapter_cfg, visual_cfg)
    resume_from = find_resume_point(cfg, settings)  # first: a refused resumption costs nothing
    if resume_from is not None and (finished := checkpoint.read_state(resume_from))["progress"]["done"]:
        say(world, f"{cfg.out}: this run has finished already ({resume_from}); --no-resume trains it again")
        distributed.finish(world)
        return finished["summary"]
    skipped: data.BadRows | None = [] if cfg.on_bad_row == "skip" else None
    if rows is None:
        rows = load_task_rows(cfg, sqa_cfg or ScienceQAConfig(), visual_cfg, skipped)
    torch.manual_seed(cfg.seed)
    if model is None:
        with distributed.main_first(world):  # the first load of the default base converts it, once
            dtype = PRECISIONS[cfg.precision]
            device = distributed.load_device(world, fsdp)
            model = LlamaAdapterModel.from_base(
                cfg.base, adapter_cfg, dtype, device, visual=visual_cfg, quantize=cfg.quantize
            )
    cache = model.feature_cache()
    train_set, val_set, dropped = training_examples(cfg, model, rows, cache, skipped, world)

    if cfg.gradient_checkpointing:
        hf.enable_gradient_checkpointing(model.base)
    loss_fn = distributed.prepare(model, world, fsdp)
    weights_mib = round(distributed.weights_mib(model), 1)  # at rest: FSDP gathers layers only while they run
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum))
    total_steps = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)
    params = list(model.adapter_state().values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup))
    model.method.begin_training(total_steps)
    progress, resumed_at = Progress(), None
    if resume_from is not None:
        progress = Progress(**checkpoint.restore(resume_from, model, optimizer, scheduler)["progress"])
        resumed_at = progress.step
        say(world, f"Resuming from {resume_from}: step {progress.step} of {total_steps}, epoch {progress.epoch}")
    pad_id = model.tokenizer.pad_token_id
    out = Path(cfg.out)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None and checkpoint.latest(out) is not None:
            # --no-resume: the earlier run's checkpoints would pass for this one's. Removed only now, when the data,
            # the images and the model have all loaded: a run that fails on bad input leaves them as they were.
            shutil.rmtree(out / checkpoint.FOLDER)
            say(world, f"--no-resume: removed the checkpoints of the earlier run in {out}")
        (out / "train_config.json").write_text(json.dumps(settings, indent=2))

    log = MetricsLog(out / "metrics.csv", keep_rows=progress.log_rows, enabled=world.main)
    if resume_from is None:
        progress.val_loss_before = evaluate(model, val_set, cfg.batch_size, pad_id, cache, world)
        log.write(step=0, epoch=0, val_loss=progress.val_loss_before)

    def save_checkpoint(summary: dict | None = None) -> None:
        progress.elapsed_s, progress.log_rows = time.perf_counter() - started, log.rows
        if world.main:
            state = {"progress": dataclasses.asdict(progress), "settings": settings, "summary": summary}
            checkpoint.save(out, model, optimizer, scheduler, state)

    started = time.perf_counter() - progress.elapsed_s
    with tqdm(total=total_steps, initial=progress.step, desc="train", unit="step", disable=not world.main) as bar:
        model.train()
        for epoch in range(progress.epoch, cfg.epochs + 1):
            groups = step_groups(train_set, cfg.batch_size, cfg.grad_accum, seed=cfg.seed + epoch)
            for group in groups[progress.group :]:
                model.method.begin_step(progress.step + 1)
                loss, tokens, padded = train_step(loss_fn, group, pad_id, cache, world, model.device)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
                stop_unless_finite(loss, float(grad_norm), progress.step + 1, out)
                optimizer.step()
                scheduler.step()
                model.method.end_step(progress.step + 1)
                optimizer.zero_grad(set_to_none=True)
                progress.step, progress.group = progress.step + 1, progress.group + 1
                progress.tokens, progress.padded = progress.tokens + tokens, progress.padded + padded
                elapsed = time.perf_counter() - started
                log.write(
                    step=progress.step,
                    epoch=epoch,
                    lr=scheduler.get_last_lr()[0],
                    train_loss=loss,
                    tokens=progress.tokens,
                    tokens_per_s=progress.tokens / elapsed,
                    elapsed_s=elapsed,
                )
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{progress.tokens / elapsed:.0f}")
                bar.update()
                if progress.step >= total_steps:
                    break
                # An epoch's last step gets its checkpoint after the validation, below.
                if progress.step % cfg.save_every == 0 and progress.group < len(groups):
                    save_checkpoint()
            progress.val_loss = evaluate(model, val_set, cfg.batch_size, pad_id, cache, world)
            log.write(step=progress.step, epoch=epoch, val_loss=progress.val_loss)
            if world.main:
                bar.write(f"epoch {epoch}: validation loss {progress.val_loss:.4f}", file=sys.stderr)
            progress.epoch, progress.group = epoch + 1, 0
            progress.done = progress.step >= total_steps or epoch == cfg.epochs
            summary = run_summary(progress, time.perf_counter() - started, model, dropped, skipped, world) | {
                "resumed_from_step": resumed_at,
                "weights_mib_per_process": weights_mib,
            }
            if world.main:
                model.save(out)
                plot_losses(log.path, out / "loss.png")
            save_checkpoint(summary if progress.done else None)
            if progress.done:
                break
    model.eval()  # trained: it answers now, without (LoRA's) dropout
    distributed.finish(world)
    return summary


def training_examples(
    cfg: TrainConfig, model: LlamaAdapterModel, rows: list[dict], cache, skipped: data.BadRows | None, world: World
) -> tuple[list[data.Example], list[data.Example], int]:
    """The training and validation examples of `rows`, with the rows whose images cannot be used left out (or an
    error), and how many training rows were dropped because their prompt alone fills max_len; reports both."""
    rows = with_usable_images(rows, cache, skipped, world, cfg.data)
    train_rows, val_rows = data.split_rows(rows, cfg.val_fraction, cfg.seed)
    train_set, dropped = data.encode_all(model.tokenizer, train_rows, cfg.max_len)
    val_set, _ = data.encode_all(model.tokenizer, val_rows, cfg.max_len)
    if not train_set:
        raise data.DataError(f"{cfg.data}: every training row's prompt is longer than max_len {cfg.max_len}")
    report_left_out(world, skipped or [], len(rows) + len(skipped or []), dropped, cfg.max_len)
    return train_set, val_set, dropped


def train_step(
    loss_fn, group: list[list[data.Example]], pad_id: int, cache: FeatureCache | None, world: World, device
) -> tuple[float, int, int]:
    """Forward and backward over one optimizer step's batches, this process's share of each.

    Every response token of the step weighs the same, whichever batch and process it is in: a share's mean loss is
    weighted by its share of the step's response tokens, times the world size because DDP averages gradients.
    Returns the step's loss, and its non-padding tokens and batch positions, all processes together.
    """
    total = sum(example.response_tokens for batch in group for example in batch)
    loss_sum, tokens, padded = 0.0, 0, 0
    for index, batch in enumerate(group):
        rows, counts = distributed.share(batch, world)
        weight = world.size * sum(example.response_tokens for example in rows) / total if counts else 0.0
        inputs = {name: tensor.to(device) for name, tensor in make_batch(rows, pad_id, cache).items()}
        with distributed.gradient_sync(loss_fn, now=index == len(group) - 1):
            loss = loss_fn(inputs) * weight
            loss.backward()
        loss_sum += loss.item() / world.size
        if counts:
            tokens += int(inputs["attention_mask"].sum())
            padded += inputs["attention_mask"].numel()
    loss_sum, tokens, padded = distributed.all_sum([loss_sum, tokens, padded], world)
    return loss_sum, int(tokens), int(padded)


def step_groups(examples: list[data.Example], batch_size: int, grad_accum: int, seed: int) -> list[list[list]]:
    """One epoch: for each optimizer step, its `grad_accum` batches of examples (length-grouped, seeded)."""
    batches = [[examples[i] for i in batch] for batch in data.length_grouped_batches(examples, batch_size, seed)]
    return [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]


def stop_unless_finite(loss: float, grad_norm: float, step: int, out: Path) -> None:
    """Stop before a non-finite loss or gradient reaches the weights; the last checkpoint stays as it was."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    last = checkpoint.latest(out)
    kept = f"the last good checkpoint, {last}, is intact" if last else "no checkpoint had been written yet"
    raise TrainingStopped(
        f"step {step}: the loss is {loss} and the gradient norm {grad_norm}: training diverged and was stopped "
        f"before this step changed the adapter; {kept}. A lower --lr, or bf16 -> fp32, usually helps."
    )


def find_resume_point(cfg: TrainConfig, settings: dict) -> Path | None:
    """The checkpoint to go on from: the newest in cfg.out, if resuming and it was made with the same settings."""
    last = checkpoint.latest(cfg.out)
    if last is None:
        return None
    if not cfg.resume:
        return None
    before = checkpoint.read_state(last)["settings"]
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


def run_settings(cfg: TrainConfig, adapter_cfg: AdapterConfig, visual_cfg: VisualConfig) -> dict:
    """Everything that decides what a run computes, as JSON (saved with the run, compared on resuming)."""
    settings = dataclasses.asdict(cfg) | {
        "adapter": adapter_cfg.to_dict(),
        "visual": dataclasses.asdict(visual_cfg),
    }
    return json.loads(json.dumps(settings))  # tuples become lists, as they come back from the file


def run_summary(progress: Progress, elapsed: float, model, dropped: int, skipped, world: World) -> dict:
    return {
        "steps": progress.step,
        "val_loss_before": progress.val_loss_before,
        "val_loss_after": progress.val_loss,
        "train_tokens": progress.tokens,
        "padding_share": 1 - progress.tokens / progress.padded,
        "tokens_per_s": progress.tokens / elapsed,
        "wall_time_s": elapsed,
        "trainable_parameters": model.num_trainable_parameters(),
        "dropped_rows": dropped,
        "skipped_rows": len(skipped or []),
        "processes": world.size,
    }


def load_task_rows(
    cfg: TrainConfig, sqa: ScienceQAConfig, visual: VisualConfig, skipped: data.BadRows | None = None
) -> list[dict]:
    """Training rows for `cfg.task`: Alpaca rows as they are, or ScienceQA's train split as Alpaca rows.

    Bad Alpaca rows go into `skipped` when it is given (see `data.load_rows`).
    """
    if cfg.task == "alpaca":
        return data.load_rows(cfg.data, skipped)
    # A text-only adapter never opens the image files, so it needs none of them.
    missing_images = sqa.missing_images if visual.clip_model else "text-only"
    problems, missing = scienceqa.load_problems(cfg.data, "train", sqa.problems, sqa.splits, missing_images)
    if missing and visual.clip_model:
        print(
            f"{missing} of {len(problems)} training problems lack their image file: trained without it", file=sys.stderr
        )
    return scienceqa.to_rows(problems, sqa.image_context, cfg.cot)


def with_usable_images(
    rows: list[dict], cache: FeatureCache | None, skipped: data.BadRows | None, world: World, source: str
) -> list[dict]:
    """The rows whose images a multimodal adapter can use, every image encoded (and cached) before training.

    An image that is missing, unreadable, corrupt or a decompression bomb raises DataError, or with a `skipped`
    list leaves its row out. A text-only adapter reads no image, so its rows are kept as they are.
    """
    named = [row["image"] for row in rows if row.get("image")]
    if cache is None:
        if named:
            say(world, f"{len(named)} rows name an image; this text-only adapter ignores them (--clip-model uses them)")
        return rows
    with distributed.main_first(world):  # one process encodes, the others read its cache
        failed = cache.precompute(named, show_progress=world.main)
    if failed and skipped is None:
        why = next(iter(failed.values()))
        raise data.DataError(
            f"{source}: {len(failed)} image(s) cannot be used, e.g. {why}; --on-bad-row skip leaves their rows out"
        )
    if failed:
        skipped += [(f"{source}: image {path}", why.removeprefix(f"{path}: ")) for path, why in failed.items()]
    return [row for row in rows if row.get("image") not in failed]


def report_left_out(world: World, skipped: data.BadRows, total: int, dropped: int, max_len: int) -> None:
    """Say on stderr which rows the run leaves out and why, the reasons counted, the first few named."""
    if skipped:
        reasons = Counter(why for _, why in skipped)
        counted = "; ".join(f"{n} x {why}" for why, n in reasons.most_common())
        say(world, f"Skipped {len(skipped)} of {total} rows (--on-bad-row skip): {counted}")
        for where, why in skipped[:5]:
            say(world, f"  {where}: {why}")
    if dropped:
        say(world, f"Dropped {dropped} training rows whose prompt alone fills max_len {max_len}")


def say(world: World, message: str) -> None:
    """A message on stderr, once: from the main process."""
    if world.main:
        print(message, file=sys.stderr)


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
    world: World | None = None,
) -> float:
    """Token-weighted mean response loss over `examples` (nan when there are none); each process takes its share."""
    world = world or World(0, 1, model.device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda example: len(example.input_ids))
    for start in range(0, len(ordered), batch_size):
        rows, counts = distributed.share(ordered[start : start + batch_size], world)
        loss = model.loss(**{k: v.to(model.device) for k, v in make_batch(rows, pad_id, cache).items()})
        if counts:
            n = sum(example.response_tokens for example in rows)
            total, count = total + loss.item() * n, count + n
    model.train(was_training)
    total, count = distributed.all_sum([total, count], world)
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
    """metrics.csv: one row per optimizer step and one per validation, written through so a crash keeps it.

    A resumed run keeps the rows its checkpoint had seen (`keep_rows`) and drops those written after it, which the
    run is about to write again. Only the main process writes (`enabled`); every process counts the rows.
    """

    FIELDS = ("step", "epoch", "lr", "train_loss", "val_loss", "tokens", "tokens_per_s", "elapsed_s")

    def __init__(self, path: Path, keep_rows: int = 0, enabled: bool = True):
        self.path, self.rows, self.enabled = path, keep_rows, enabled
        if not enabled:
            return
        kept = []
        if keep_rows and path.exists():
            with open(path, newline="") as f:
                kept = list(csv.DictReader(f))[:keep_rows]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)

    def write(self, **values) -> None:
        self.rows += 1
        if self.enabled:
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
