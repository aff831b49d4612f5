"""Fine-tune an adapter on Alpaca-format instructions (the paper's recipe, scaled to the batch): the training loop.

llama-adapter train --data alpaca.json --out runs/alpaca
torchrun --nproc-per-node 2 -m llama_adapter train --data alpaca.json --out runs/alpaca   (= train --nproc 2)

A run writes a checkpoint every --save-every steps and at the end of each epoch (checkpoint.py); started again with
the same --out it goes on from its last checkpoint exactly as if it had never stopped. What it reports is in
run_log.py; how a task becomes rows, in tasks.py; the order of the steps, in plan.py.
"""

import dataclasses
import hashlib
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

from .. import files, methods
from ..adapter_files import WEIGHTS_NAME
from ..base import routing
from ..config import DEFAULT_BASE, PRECISIONS, ScienceQAConfig, VisualConfig
from ..data import batching, encoding, reading, templates
from ..data.batching import make_batch
from ..methods import AdapterConfig
from ..model import LlamaAdapterModel
from ..visual import FeatureCache
from . import checkpoint, distributed, trackers
from .config import TrainConfig, check_joint_training, run_settings
from .distributed import World
from .optim import optimizer_for, warmup_cosine
from .plan import Plan
from .resume import check_same_data, find_resume_point
from .run_log import MetricsLog, plot_losses, run_summary, say
from .tasks import check_every_row_has_an_image, is_conversational, load_task_rows, rows_hash, training_examples


class TrainingStopped(RuntimeError):
    """The run cannot go on (a loss that is not finite); what it saved before is intact."""


@dataclass
class Progress:
    """Where a run stands: saved in every checkpoint, and with the tensors all a resumed run needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch in progress, from 1
    group: int = 0  # optimizer steps done in that epoch: the position in its batches
    tokens: int = 0  # non-padding tokens trained, all processes together
    padded: int = 0  # batch positions, padding included
    elapsed_s: float = 0.0
    image_steps: int = 0  # of those, image-text steps (joint training)
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
    rows: list[dict] | datasets.Dataset | None = None,
    fsdp: bool = False,
) -> dict:
    """Train, validating before the first step and after each epoch; returns a summary of the run.

    `model` defaults to `cfg.model.base` with a fresh adapter (multimodal if `visual_cfg` names a CLIP model); pass
    one to train an adapter you built yourself. `rows` default to those of `cfg.data`, read as `cfg.task` says.
    Under torchrun every process runs this and they train as one (distributed.py); `fsdp` shards the base.
    """
    if not methods.get(adapter_cfg.method).supports_gradient_checkpointing and cfg.gradient_checkpointing:
        raise ValueError(f"--gradient-checkpointing does not work with --method {adapter_cfg.method}")
    if not methods.get(adapter_cfg.method).tokens_only and cfg.packing:
        raise ValueError(f"--packing does not work with --method {adapter_cfg.method}: its virtual tokens come first")
    if cfg.image_data is not None:
        check_joint_training(adapter_cfg, visual_cfg or VisualConfig())
    if cfg.model.quantize != "none" and fsdp:
        raise ValueError("--fsdp cannot shard a quantised base; use --quantize none, or DDP without --fsdp")
    trackers.check_installed(cfg.report_to)
    world = distributed.setup()
    if not world.main:
        return _train(cfg, adapter_cfg, model, visual_cfg or VisualConfig(), sqa_cfg, rows, fsdp, world)
    out = Path(cfg.out)
    files.check_can_write(out, "--out", folder=True)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with files.held(out / LOCK_NAME, f"--out {out}"):  # one run writes a run folder at a time
            return _train(cfg, adapter_cfg, model, visual_cfg or VisualConfig(), sqa_cfg, rows, fsdp, world)
    finally:
        if made and not any(out.iterdir()):  # a run that stopped before writing leaves no empty folder behind
            out.rmdir()


LOCK_NAME = ".lock"


def _train(
    cfg: TrainConfig, adapter_cfg: AdapterConfig, model: LlamaAdapterModel | None, visual_cfg: VisualConfig,
    sqa_cfg: ScienceQAConfig | None, rows: list[dict] | datasets.Dataset | None, fsdp: bool, world: World,
) -> dict:  # fmt: skip
    settings = run_settings(cfg, adapter_cfg, visual_cfg)
    resume_from = find_resume_point(cfg, settings)  # first: a refused resumption costs nothing
    before = checkpoint.read_state(resume_from) if resume_from is not None else None
    if before is not None and before["progress"]["done"]:
        say(world, f"{cfg.out}: this run has finished already ({resume_from}); --no-resume trains it again")
        if model is not None:  # the caller's model leaves as trained, as it would after the run itself
            model.load_adapter_weights(resume_from / WEIGHTS_NAME)
        distributed.finish(world)
        return before["summary"]
    skipped: reading.BadRows | None = [] if cfg.on_bad_row == "skip" else None
    rows, image_rows, data_hash = _read_rows(cfg, sqa_cfg or ScienceQAConfig(), visual_cfg, rows, skipped, world)
    if before is not None:
        check_same_data(before, resume_from, data_hash, cfg.data)
    torch.manual_seed(cfg.seed)  # every process builds the same adapter
    if model is None:
        with distributed.main_first(world):  # the first load of the default base converts it, once
            model = LlamaAdapterModel.from_base(
                DEFAULT_BASE if cfg.model.base is None else cfg.model.base, adapter_cfg, PRECISIONS[cfg.model.precision],
                distributed.load_device(world, fsdp), visual=visual_cfg, quantize=cfg.model.quantize,
            )  # fmt: skip
    model.template = templates.choose(cfg.template, is_conversational(rows), model.tokenizer)
    distributed.seed(cfg.seed, world)  # and draws its own dropout masks
    run = _Run(cfg, model, world, settings, data_hash, skipped)
    run.prepare(rows, image_rows, fsdp)
    if resume_from is None:
        run.start()
    else:
        run.resume(resume_from)
    return run.train()


def _read_rows(
    cfg: TrainConfig, sqa_cfg: ScienceQAConfig, visual_cfg: VisualConfig, rows, skipped, world: World
) -> tuple[datasets.Dataset, datasets.Dataset | None, str]:
    """The training rows (`rows`, or those of cfg.data), the image-text rows of joint training, and their content
    hash, which a resumed run must match."""
    image_rows = None
    with distributed.main_first(world):  # one process fills the datasets cache, the others read it
        if rows is None:
            rows = load_task_rows(cfg, sqa_cfg, visual_cfg, skipped)
        rows = reading.as_rows(rows)
        if cfg.image_data is not None:
            image_rows = reading.as_rows(reading.load_rows(cfg.image_data, skipped))
            check_every_row_has_an_image(image_rows, cfg.image_data)
    data_hash = rows_hash(rows)
    if image_rows is not None:
        data_hash = hashlib.sha256(f"{data_hash} {rows_hash(image_rows)}".encode()).hexdigest()
    return rows, image_rows, data_hash


class _Run:
    """One training run: its examples, plan, optimizer and schedule, metrics and progress. `train` is the loop."""

    def __init__(
        self, cfg: TrainConfig, model: LlamaAdapterModel, world: World, settings: dict, data_hash: str, skipped
    ):
        self.cfg, self.model, self.world, self.skipped = cfg, model, world, skipped
        self.settings, self.data_hash = settings, data_hash
        self.out = Path(cfg.out)
        self.progress, self.resumed_at = Progress(), None
        self.pad_id = batching.pad_id(model.tokenizer)
        self.cache = model.feature_cache()

    def prepare(self, rows: datasets.Dataset, image_rows: datasets.Dataset | None, fsdp: bool) -> None:
        """Tokenise the rows (and encode their images), plan the steps, and set up the optimizer and schedule."""
        cfg, model, world = self.cfg, self.model, self.world
        max_len = cfg.max_length(model.context_length)
        sets = [(rows, cfg.data)] + ([(image_rows, cfg.image_data)] if image_rows is not None else [])
        examples = [
            training_examples(
                r, model.tokenizer, cfg.val_fraction, cfg.seed, max_len, s, self.skipped, world, self.cache,
                model.template,
            )
            for r, s in sets
        ]  # fmt: skip
        self.val_set = [example for _, val, _ in examples for example in val]  # validation weighs both kinds
        self.dropped = sum(dropped for _, _, dropped in examples)
        image_set = examples[1][0] if image_rows is not None else None
        self.plan = Plan(cfg, examples[0][0], image_set, max_len)
        if cfg.gradient_checkpointing:
            routing.enable_gradient_checkpointing(model.base)
        self.loss_fn = distributed.prepare(model, world, fsdp, cfg.eos_weight)
        self.weights_mib = round(distributed.weights_mib(model), 1)  # at rest: FSDP gathers layers only as they run
        image_names = model.image_parameter_names() if image_set is not None else set()
        state = model.adapter_state()
        self.text_params = [p for name, p in state.items() if name not in image_names]
        self.image_params = [p for name, p in state.items() if name in image_names]
        self.optimizer = optimizer_for(model, self.settings["lr"], cfg.weight_decay)
        factor = warmup_cosine(self.plan.total_steps, cfg.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        model.method.begin_training(self.plan.total_steps)

    def start(self) -> None:
        """A new run: the earlier run's checkpoints go, and the validation loss before any step is logged."""
        if self.world.main and checkpoint.latest(self.out) is not None:
            # --no-resume: the earlier run's checkpoints would pass for this one's. Removed only now, when the data,
            # the images and the model have all loaded: a run that fails on bad input leaves them as they were.
            shutil.rmtree(self.out / checkpoint.FOLDER)
            say(self.world, f"--no-resume: removed the checkpoints of the earlier run in {self.out}")
        self._write_settings()
        self.log = MetricsLog(self.out / "metrics.csv", enabled=self.world.main)
        self.tracker = trackers.open_tracker(self.cfg, self.world, None, self.settings)
        self.progress.val_loss_before = self._validate(epoch=0)

    def resume(self, folder: Path) -> None:
        state = checkpoint.restore(folder, self.model, self.optimizer, self.scheduler, self.world.rank)
        self.progress = Progress(**state["progress"])
        self.resumed_at = self.progress.step
        step, total, epoch = self.progress.step, self.plan.total_steps, self.progress.epoch
        say(self.world, f"Resuming from {folder}: step {step} of {total}, epoch {epoch}")
        self._write_settings()
        self.log = MetricsLog(self.out / "metrics.csv", keep_rows=self.progress.log_rows, enabled=self.world.main)
        self.tracker = trackers.open_tracker(self.cfg, self.world, step, self.settings)

    def train(self) -> dict:
        """Epochs from where the run stands: their steps, then validation, the adapter and a checkpoint; returns the
        summary."""
        cfg, progress = self.cfg, self.progress
        self.started = time.perf_counter() - progress.elapsed_s
        with self.tracker, tqdm(total=self.plan.total_steps, initial=progress.step, desc="train", unit="step",
                                disable=not self.world.main) as self.bar:  # fmt: skip
            self.model.train()
            for epoch in range(progress.epoch, cfg.epochs + 1):
                self._train_epoch(epoch)
                summary = self._end_epoch(epoch)
                if progress.done:
                    break
        self.model.eval()  # trained: it answers now, without (LoRA's) dropout
        distributed.finish(self.world)
        return summary

    def _train_epoch(self, epoch: int) -> None:
        """The epoch's steps from where it stands, each followed by the image-text steps due after it; validation
        every --eval-steps steps and a checkpoint every --save-every steps (the epoch's last step gets its own)."""
        progress, steps = self.progress, self.plan.epoch(epoch)
        for batches in steps[progress.group :]:
            before = progress.step
            self._step(epoch, batches, trained=self.text_params, idle=self.image_params)
            progress.group += 1
            while self.plan.image_step_next(progress.step, progress.image_steps):
                self._step(epoch, self.plan.image_step(progress.image_steps), self.image_params, self.text_params)
                progress.image_steps += 1
            if progress.step >= self.plan.total_steps or progress.group == len(steps):
                return
            if self.cfg.eval_steps and progress.step // self.cfg.eval_steps > before // self.cfg.eval_steps:
                self._validate(epoch)
            if progress.step // self.cfg.save_every > before // self.cfg.save_every:
                self._save()

    def _step(self, epoch: int, batches: list, trained: list, idle: list) -> None:
        """One optimizer step on `batches` that changes the `trained` parameters and leaves the `idle` ones (in joint
        training, the other kind of batch's) as they are."""
        model, optimizer, step = self.model, self.optimizer, self.progress.step + 1
        with model.shared.reserved():  # forward and backward: no other call may run on the base in between
            model.method.begin_step(step)
            loss, tokens, padded = train_step(self.loss_fn, batches, self.pad_id, self.cache, self.world, model.device)
            for p in idle:
                p.grad = None  # AdamW leaves a parameter without a gradient as it is, moments included
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, max_norm=1.0)
            stop_unless_finite(loss, float(grad_norm), step, self.out)
            optimizer.step()
            self.scheduler.step()
            model.method.end_step(step)
            optimizer.zero_grad(set_to_none=True)
        progress = self.progress
        progress.step, progress.tokens, progress.padded = step, progress.tokens + tokens, progress.padded + padded
        elapsed = time.perf_counter() - self.started
        lr, tokens_per_s = self.scheduler.get_last_lr()[0], progress.tokens / elapsed
        self.log.write(
            step=step, epoch=epoch, lr=lr, train_loss=loss, tokens=progress.tokens, tokens_per_s=tokens_per_s,
            elapsed_s=elapsed,
        )  # fmt: skip
        self.tracker.log_train(step, loss, lr, tokens_per_s)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{progress.tokens / elapsed:.0f}")
        self.bar.update()

    def _end_epoch(self, epoch: int) -> dict:
        """Validate, save the adapter and a checkpoint; returns the run's summary so far."""
        progress, world = self.progress, self.world
        progress.val_loss = self._validate(epoch)
        if world.main and self.val_set:
            self.bar.write(f"epoch {epoch}: validation loss {progress.val_loss:.4f}", file=sys.stderr)
        progress.epoch, progress.group = epoch + 1, 0
        progress.done = progress.step >= self.plan.total_steps or epoch == self.cfg.epochs
        elapsed = time.perf_counter() - self.started
        summary = run_summary(progress, elapsed, self.model, self.dropped, self.skipped, world) | {
            "resumed_from_step": self.resumed_at,
            "template": self.model.template,
            "weights_mib_per_process": self.weights_mib,
        }
        if world.main:
            self.model.save(self.out)
            plot_losses(self.log.path, self.out / "loss.png")
        self._save(summary if progress.done else None)
        return summary

    def _save(self, summary: dict | None = None) -> None:
        progress = self.progress
        progress.elapsed_s, progress.log_rows = time.perf_counter() - self.started, self.log.rows
        rng = distributed.rng_states(self.world)  # every process's: each resumes its own random stream
        if self.world.main:
            state = {"progress": dataclasses.asdict(progress), "settings": self.settings}
            state |= {"data_sha256": self.data_hash, "summary": summary}
            checkpoint.save(self.out, self.model, self.optimizer, self.scheduler, state, rng)

    def _validate(self, epoch: int) -> float:
        """The validation loss, logged to metrics.csv and the tracker; without validation rows none runs (nan)."""
        if not self.val_set:
            return math.nan
        loss = evaluate(self.model, self.val_set, self.cfg.batch_size, self.pad_id, self.cache, self.world)
        self.log.write(step=self.progress.step, epoch=epoch, val_loss=loss)
        self.tracker.log_validation(self.progress.step, loss)
        return loss

    def _write_settings(self) -> None:
        if self.world.main:
            files.write_json(self.out / "train_config.json", self.settings | {"data_sha256": self.data_hash})


def train_step(
    loss_fn, group: list[list[encoding.Example]] | list[list[encoding.Pack]], pad_id: int, cache: FeatureCache | None,
    world: World, device,
) -> tuple[float, int, int]:  # fmt: skip
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


@torch.no_grad()
def evaluate(
    model: LlamaAdapterModel,
    examples: Sequence[encoding.Example],
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
    starts = range(0, len(ordered), batch_size)
    for start in tqdm(starts, desc="validation", unit="batch", leave=False, disable=not world.main):
        rows, counts = distributed.share(ordered[start : start + batch_size], world)
        loss = model.loss(**{k: v.to(model.device) for k, v in make_batch(rows, pad_id, cache).items()})
        if counts:
            n = sum(example.response_tokens for example in rows)
            total, count = total + loss.item() * n, count + n
    model.train(was_training)
    total, count = distributed.all_sum([total, count], world)
    return total / count if count else math.nan
