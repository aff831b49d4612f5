"""Fine-tune an adapter on Alpaca-format instructions (the paper's recipe, scaled to the batch): the training loop.

llama-adapter train --data alpaca.json --out runs/alpaca
torchrun --nproc-per-node 2 -m llama_adapter train --data alpaca.json --out runs/alpaca   (= train --nproc 2)

A run writes a checkpoint every --save-every steps and at the end of each epoch (checkpoint.py); started again with
the same --out it goes on from its last checkpoint exactly as if it had never stopped. What it reports is in
run_log.py; how a task becomes rows and batches, in task_rows.py.
"""

import dataclasses
import fractions
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
from tqdm.auto import tqdm

from . import checkpoint, data, distributed, files, hf, methods
from .adapter_files import WEIGHTS_NAME
from .config import PRECISIONS, SEED_MAX, BaseModelConfig, Checked, ScienceQAConfig, VisualConfig, flat_dict, option
from .distributed import World
from .methods import AdapterConfig
from .model import LlamaAdapterModel
from .run_log import MetricsLog, plot_losses, run_summary, say
from .task_rows import load_task_rows, make_batch, rows_hash, training_examples
from .visual import FeatureCache

# Settings a resumed run may change: none of them changes what is computed.
RESUMABLE_CHANGES = ("out", "resume", "save_every", "gradient_checkpointing")
DEFAULT_MAX_LEN = 512  # tokens of prompt + response, as the paper trains Alpaca


class TrainingStopped(RuntimeError):
    """The run cannot go on (a loss that is not finite); what it saved before is intact."""


@dataclass(kw_only=True)
class TrainConfig(Checked):
    """Fine-tuning: data, optimisation and output."""

    data: str = option(
        "alpaca: rows {instruction, input, output[, image]} in a JSON, JSONL, CSV or Parquet file, a save_to_disk "
        "folder or a hub dataset name; scienceqa: its folder, or its hub layout (docs/data.md)"
    )
    data_split: str = option("which split of a save_to_disk folder or hub dataset (a file is all one split)", "train")
    data_config: str | None = option("the configuration (subset) of a hub dataset that has several", None)
    columns: str = option(
        "alpaca: the source's column names where they differ, e.g. instruction=prompt,output=completion", ""
    )
    out: str = option("output folder for the adapter, checkpoints, metrics.csv and loss.png")
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    task: Literal["alpaca", "scienceqa"] = option("what --data holds", "alpaca")
    explanation: Literal["none", "after", "before"] = option(
        "scienceqa: the target's lecture and solution (chain of thought): none, after the answer (the paper's "
        "order) or before it (then only --scoring generate can evaluate it)",
        "none",
    )
    answer_form: Literal["letter", "text"] = option(
        "scienceqa: the target names the option by its letter ('The answer is B.') or by its own text ('The answer "
        "is carbon dioxide.'), which small models learn far better",
        "letter",
    )
    extra_train: tuple[str, ...] = option(
        "scienceqa: more training problems, from LLM-Adapters' multiple-choice train.json files (ARC-Easy, "
        "ARC-Challenge, openbookqa), asked in ScienceQA's prompt shape with answer-only targets",
        (),
    )
    lr: float | None = option(
        f"peak learning rate (default: the method's; LLaMA-Adapter's is {methods.PAPER_BASE_LR} x batch-size x "
        "grad-accum / 256, as the paper; docs/methods.md lists the others)",
        None,
        above=0,
    )
    epochs: int = option("passes over the training rows", 5, at_least=1)
    batch_size: int = option("rows per forward pass, over all processes together", 4, at_least=1)
    grad_accum: int = option("forward passes per optimizer step", 1, at_least=1)
    max_steps: int | None = option("stop after this many optimizer steps (default: epochs' worth)", None, at_least=1)
    max_len: int | None = option(
        f"truncate prompt + response to this many tokens, at most the base's context (default: {DEFAULT_MAX_LEN}, or "
        "the base's context where that is shorter)",
        None,
        at_least=1,
    )
    packing: bool = option(
        "lay whole rows end to end in sequences of up to --max-len tokens, each row seeing only itself: no compute "
        "goes to padding; --batch-size then counts such sequences",
        False,
    )
    gradient_checkpointing: bool = option(
        "recompute each layer's activations in the backward pass: far less memory for long sequences, about a "
        "third more compute",
        False,
    )
    seed: int = option(
        "seed for the split, the shuffling, the prompt initialisation and dropout", 0, at_least=0, at_most=SEED_MAX
    )
    val_fraction: float = option("share of rows held out for validation loss", 0.05, at_least=0, below=1)
    weight_decay: float = option("AdamW weight decay", 0.02, at_least=0)
    image_data: str | None = option(
        "joint training (llama-adapter-v2 with --clip-model): image-text rows {instruction, input, output, image}, "
        "each with an image, in any --data format; their batches update only the visual projection and the early "
        "prompts, --data's batches only the rest",
        None,
    )
    image_ratio: float = option("joint training: image-text batches per --data batch", 1.0, above=0)
    eos_weight: float = option(
        "weight of the EOS that ends each response in the training loss, 1 being every other token's: above 1 "
        "teaches a model whose answers run on to stop (validation loss always weighs it 1)",
        1.0,
        above=0,
    )
    warmup: float = option(
        "share of steps with linear warm-up before cosine decay (2 of 5 epochs in the paper)", 0.4, at_least=0, below=1
    )
    save_every: int = option(
        "write a checkpoint every this many optimizer steps, besides each epoch's end", 50, at_least=1
    )
    resume: bool = option("go on from the last checkpoint in --out, if any (--no-resume starts over)", True)
    on_bad_row: Literal["error", "skip"] = option(
        "a bad data row (or image) stops the run naming it, or is left out and counted in the report", "error"
    )

    def __post_init__(self):
        super().__post_init__()
        data.parse_columns(self.columns)  # a malformed mapping stops the run before anything loads
        if self.task != "scienceqa" and (
            self.extra_train or self.explanation != "none" or self.answer_form != "letter"
        ):
            raise ValueError(
                "--extra-train, --explanation and --answer-form shape ScienceQA's rows: they need --task scienceqa"
            )

    def learning_rate(self, method: str) -> float:
        """--lr, or the default of `method` for this effective batch."""
        return self.lr if self.lr is not None else methods.get(method).learning_rate(self.batch_size * self.grad_accum)

    def max_length(self, context: int) -> int:
        """--max-len, or the default cut to a base's shorter `context`; a --max-len beyond the context is refused:
        its rows would run past the positions the base knows."""
        if self.max_len is None:
            return min(DEFAULT_MAX_LEN, context)
        if self.max_len > context:
            raise ValueError(f"max_len must be <= {context} (the base's context), got {self.max_len}")
        return self.max_len


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
    cfg: TrainConfig,
    adapter_cfg: AdapterConfig,
    model: LlamaAdapterModel | None,
    visual_cfg: VisualConfig,
    sqa_cfg: ScienceQAConfig | None,
    rows: list[dict] | datasets.Dataset | None,
    fsdp: bool,
    world: World,
) -> dict:
    settings = run_settings(cfg, adapter_cfg, visual_cfg)
    resume_from = find_resume_point(cfg, settings)  # first: a refused resumption costs nothing
    before = checkpoint.read_state(resume_from) if resume_from is not None else None
    if before is not None and before["progress"]["done"]:
        say(world, f"{cfg.out}: this run has finished already ({resume_from}); --no-resume trains it again")
        if model is not None:  # the caller's model leaves as trained, as it would after the run itself
            model.load_adapter_weights(resume_from / WEIGHTS_NAME)
        distributed.finish(world)
        return before["summary"]
    skipped: data.BadRows | None = [] if cfg.on_bad_row == "skip" else None
    image_rows = None
    with distributed.main_first(world):  # one process fills the datasets cache, the others read it
        if rows is None:
            rows = load_task_rows(cfg, sqa_cfg or ScienceQAConfig(), visual_cfg, skipped)
        rows = data.as_rows(rows)
        if cfg.image_data is not None:
            image_rows = data.as_rows(data.load_rows(cfg.image_data, skipped))
            check_every_row_has_an_image(image_rows, cfg.image_data)
    data_hash = rows_hash(rows)
    if image_rows is not None:
        data_hash = hashlib.sha256(f"{data_hash} {rows_hash(image_rows)}".encode()).hexdigest()
    if before is not None:
        check_same_data(before, resume_from, data_hash, cfg.data)
    torch.manual_seed(cfg.seed)  # every process builds the same adapter
    if model is None:
        with distributed.main_first(world):  # the first load of the default base converts it, once
            model = LlamaAdapterModel.from_base(
                hf.DEFAULT_BASE if cfg.model.base is None else cfg.model.base, adapter_cfg, PRECISIONS[cfg.model.precision],
                distributed.load_device(world, fsdp), visual=visual_cfg, quantize=cfg.model.quantize,
            )  # fmt: skip
    max_len = cfg.max_length(model.context_length)
    distributed.seed(cfg.seed, world)  # and draws its own dropout masks
    cache = model.feature_cache()
    train_set, val_set, dropped = training_examples(
        rows, model.tokenizer, cfg.val_fraction, cfg.seed, max_len, cfg.data, skipped, world, cache
    )
    image_set = None
    if image_rows is not None:
        image_set, image_val, image_dropped = training_examples(
            image_rows, model.tokenizer, cfg.val_fraction, cfg.seed, max_len, cfg.image_data, skipped, world, cache
        )
        val_set, dropped = [*val_set, *image_val], dropped + image_dropped  # validation weighs both kinds

    if cfg.gradient_checkpointing:
        hf.enable_gradient_checkpointing(model.base)
    loss_fn = distributed.prepare(model, world, fsdp, cfg.eos_weight)
    weights_mib = round(distributed.weights_mib(model), 1)  # at rest: FSDP gathers layers only while they run
    packs = data.packs(train_set.lengths, max_len, cfg.seed) if cfg.packing else None  # the same every epoch
    steps_per_epoch = math.ceil(len(packs or train_set) / (cfg.batch_size * cfg.grad_accum))
    ratio = fractions.Fraction(repr(cfg.image_ratio)) if image_set is not None else 0  # exact: 0.3 x 10 is 3

    def image_steps_due(text_steps: int) -> int:
        """Image-text steps that follow the first `text_steps` instruction steps, all together."""
        return math.floor(text_steps * ratio)

    text_steps = cfg.epochs * steps_per_epoch
    total_steps = min(math.inf if cfg.max_steps is None else cfg.max_steps, text_steps + image_steps_due(text_steps))
    state = model.adapter_state()
    image_names = model.image_parameter_names() if image_set is not None else set()
    text_params = [p for name, p in state.items() if name not in image_names]
    image_params = [p for name, p in state.items() if name in image_names]
    undecayed = model.method.undecayed_parameters()
    optimizer = adamw(
        [p for name, p in state.items() if name not in undecayed],
        settings["lr"],
        cfg.weight_decay,
        undecayed=[p for name, p in state.items() if name in undecayed],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup))
    model.method.begin_training(total_steps)
    progress, resumed_at = Progress(), None
    if resume_from is not None:
        state = checkpoint.restore(resume_from, model, optimizer, scheduler, world.rank)
        progress = Progress(**state["progress"])
        resumed_at = progress.step
        say(world, f"Resuming from {resume_from}: step {progress.step} of {total_steps}, epoch {progress.epoch}")
    pad_id = data.pad_id(model.tokenizer)
    out = Path(cfg.out)
    if world.main:
        if resume_from is None and checkpoint.latest(out) is not None:
            # --no-resume: the earlier run's checkpoints would pass for this one's. Removed only now, when the data,
            # the images and the model have all loaded: a run that fails on bad input leaves them as they were.
            shutil.rmtree(out / checkpoint.FOLDER)
            say(world, f"--no-resume: removed the checkpoints of the earlier run in {out}")
        files.write_json(out / "train_config.json", settings | {"data_sha256": data_hash})

    log = MetricsLog(out / "metrics.csv", keep_rows=progress.log_rows, enabled=world.main)
    if resume_from is None:
        progress.val_loss_before = evaluate(model, val_set, cfg.batch_size, pad_id, cache, world)
        log.write(step=0, epoch=0, val_loss=progress.val_loss_before)

    def save_checkpoint(summary: dict | None = None) -> None:
        progress.elapsed_s, progress.log_rows = time.perf_counter() - started, log.rows
        rng = distributed.rng_states(world)  # every process's: each resumes its own random stream
        if world.main:
            state = {"progress": dataclasses.asdict(progress), "settings": settings, "data_sha256": data_hash}
            checkpoint.save(out, model, optimizer, scheduler, state | {"summary": summary}, rng)

    started = time.perf_counter() - progress.elapsed_s
    image_groups = {}  # pass over the image-text rows -> its optimizer steps' batches

    def next_image_group() -> list[list[data.Example]]:
        """The batches of the next image-text step: the image rows go round in a new order each pass."""
        per_pass = math.ceil(len(image_set) / (cfg.batch_size * cfg.grad_accum))
        turn, position = divmod(progress.image_steps, per_pass)
        if turn not in image_groups:
            image_groups.clear()
            image_groups[turn] = step_groups(image_set, cfg.batch_size, cfg.grad_accum, seed=cfg.seed - 1 - turn)
        return [[image_set[i] for i in batch] for batch in image_groups[turn][position]]

    def optimizer_step(group, trained: list[torch.nn.Parameter], idle: list[torch.nn.Parameter]) -> float:
        """One step on `group`'s batches that changes the `trained` parameters and leaves the `idle` ones (in joint
        training, the other kind of batch's) as they are; returns its loss."""
        with model.shared.reserved():  # forward and backward: no other call may run on the base in between
            model.method.begin_step(progress.step + 1)
            loss, tokens, padded = train_step(loss_fn, group, pad_id, cache, world, model.device)
            for p in idle:
                p.grad = None  # AdamW leaves a parameter without a gradient as it is, moments included
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, max_norm=1.0)
            stop_unless_finite(loss, float(grad_norm), progress.step + 1, out)
            optimizer.step()
            scheduler.step()
            model.method.end_step(progress.step + 1)
            optimizer.zero_grad(set_to_none=True)
        progress.step = progress.step + 1
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
        return loss

    with tqdm(total=total_steps, initial=progress.step, desc="train", unit="step", disable=not world.main) as bar:
        model.train()
        for epoch in range(progress.epoch, cfg.epochs + 1):
            groups = step_groups(train_set, cfg.batch_size, cfg.grad_accum, seed=cfg.seed + epoch, packs=packs)
            for indices in groups[progress.group :]:
                before = progress.step
                optimizer_step(
                    [[fetch(train_set, member) for member in batch] for batch in indices], text_params, image_params
                )
                progress.group += 1
                while progress.step < total_steps and progress.image_steps < image_steps_due(
                    progress.step - progress.image_steps
                ):
                    optimizer_step(next_image_group(), image_params, text_params)
                    progress.image_steps += 1
                if progress.step >= total_steps:
                    break
                # An epoch's last step gets its checkpoint after the validation, below.
                if progress.step // cfg.save_every > before // cfg.save_every and progress.group < len(groups):
                    save_checkpoint()
            progress.val_loss = evaluate(model, val_set, cfg.batch_size, pad_id, cache, world)
            log.write(step=progress.step, epoch=epoch, val_loss=progress.val_loss)
            if world.main and val_set:
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


def train_step(
    loss_fn, group: list[list[data.Example]] | list[list[data.Pack]], pad_id: int, cache: FeatureCache | None,
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


def step_groups(
    examples: data.Examples, batch_size: int, grad_accum: int, seed: int, packs: list[list[int]] | None = None
) -> list[list[list]]:
    """One epoch: for each optimizer step, its `grad_accum` batches, of example indices (length-grouped) or, given
    `packs`, of packs (lists of example indices); seeded."""
    if packs is None:
        batches = data.length_grouped_batches(examples.lengths, batch_size, seed)
    else:
        order = list(range(len(packs)))
        random.Random(seed).shuffle(order)
        batches = [[packs[j] for j in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
    return [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]


def fetch(examples: data.Examples, member: int | list[int]) -> data.Example | data.Pack:
    """A batch member as step_groups names it: one example, or the pack of the examples listed."""
    return data.Pack([examples[i] for i in member]) if isinstance(member, list) else examples[member]


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


# Settings added after runs began saving theirs, with the value every run before them had.
SETTINGS_ADDED = {"eos_weight": 1.0, "image_data": None, "image_ratio": 1.0, "extra_train": [], "answer_form": "letter"}
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


def check_joint_training(adapter_cfg: AdapterConfig, visual_cfg: VisualConfig) -> None:
    """Refuse --image-data where there is no image side to train apart."""
    if not methods.get(adapter_cfg.method).trains_jointly or not visual_cfg.clip_model:
        able = " or ".join(methods.with_capability("trains_jointly"))
        raise ValueError(
            "--image-data trains a multimodal adapter's image side apart from its text side: it needs --method "
            f"{able} and --clip-model (got --method {adapter_cfg.method}"
            f"{'' if visual_cfg.clip_model else ' and no --clip-model'})"
        )


def check_every_row_has_an_image(rows: datasets.Dataset, source: str) -> None:
    """Image-text rows without an image would train the image side on text alone."""
    missing = next((i for i, image in enumerate(rows["image"]) if not image), None)
    if missing is not None:
        raise data.DataError(f"{source}: row {missing + 1} has no image; every --image-data row needs one")


def check_same_data(state: dict, resume_from: Path, data_hash: str, source: str) -> None:
    """Refuse to resume on training data whose content differs from the data the checkpoint (`state`) was trained on."""
    before = state.get("data_sha256", data_hash)  # checkpoints made before the hash was kept have none
    if before != data_hash:
        raise ValueError(
            f"{source}: the training data changed since {resume_from} was made (content hash {before[:12]}, now "
            f"{data_hash[:12]}): resuming would not continue that run; restore the data, or use --no-resume"
        )


def run_settings(cfg: TrainConfig, adapter_cfg: AdapterConfig, visual_cfg: VisualConfig) -> dict:
    """Everything that decides what a run computes, as JSON (saved with the run, compared on resuming)."""
    settings = flat_dict(cfg) | {
        "lr": cfg.learning_rate(adapter_cfg.method),
        # The length asked for, as every run saved it before the default followed a shorter context: with the base
        # (saved too) it decides the length trained at.
        "max_len": DEFAULT_MAX_LEN if cfg.max_len is None else cfg.max_len,
        "adapter": adapter_cfg.to_dict(),
        "visual": dataclasses.asdict(visual_cfg),
    }
    return json.loads(json.dumps(settings))  # tuples become lists, as they come back from the file


@torch.no_grad()
def evaluate(
    model: LlamaAdapterModel,
    examples: Sequence[data.Example],
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


def adamw(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, undecayed: Sequence[torch.nn.Parameter] = ()
) -> torch.optim.AdamW:
    """The paper's AdamW (betas 0.9, 0.95), fused: one kernel updates every adapter tensor, instead of a few per
    tensor, which on a GPU costs launches for each of the hundred-odd small tensors of an adapter. The `undecayed`
    parameters (V2's scales) form a second group without weight decay."""
    groups = [{"params": params}] + ([{"params": list(undecayed), "weight_decay": 0.0}] if undecayed else [])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=True)


def warmup_cosine(total_steps: int, warmup: float):
    """LR multiplier: linear from 0 to 1 over the warm-up share of steps, then half a cosine down to 0."""
    warmup_steps = warmup * total_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


if __name__ == "__main__":  # python -m llama_adapter.train ARGS is python -m llama_adapter train ARGS
    import runpy

    sys.argv.insert(1, "train")
    runpy.run_module("llama_adapter", run_name="__main__", alter_sys=True)
