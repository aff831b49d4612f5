"""TrainConfig: what a training run reads, how it optimises and where it writes; and the settings a run saves
(and a resumed run compares)."""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

from .. import methods
from ..config import SEED_MAX, BaseModelConfig, Checked, VisualConfig, flat_dict, option
from ..methods import AdapterConfig

DEFAULT_MAX_LEN = 512  # tokens of prompt + response, as the paper trains Alpaca


@dataclass(kw_only=True)
class TrainConfig(Checked):
    """Fine-tuning: data, optimisation and output."""

    data: str = option(
        "alpaca: rows {instruction, input, output[, image]} or conversations {messages[, image]} in a JSON, JSONL, "
        "CSV or Parquet file, a save_to_disk folder or a hub dataset name; scienceqa: its folder, or its hub layout "
        "(docs/data.md)"
    )
    data_split: str = option("which split of a save_to_disk folder or hub dataset (a file is all one split)", "train")
    data_config: str | None = option("the configuration (subset) of a hub dataset that has several", None)
    columns: str = option(
        "alpaca: the source's column names where they differ, e.g. instruction=prompt,output=completion", ""
    )
    out: str = option("output folder for the adapter, checkpoints, metrics.csv and loss.png")
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    task: Literal["alpaca", "scienceqa"] = option("what --data holds", "alpaca")
    template: Literal["auto", "alpaca", "chat"] = option(
        "the prompt template the adapter learns and answers in: Alpaca's, or the base tokenizer's chat template; "
        "auto: chat for conversational data (messages or conversations) on a base that has one, Alpaca otherwise",
        "auto",
    )
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
    eval_steps: int | None = option(
        "also validate every this many optimizer steps (default: before the first step and at each epoch's end only)",
        None,
        at_least=1,
    )
    report_to: Literal["none", "tensorboard", "wandb"] = option(
        "also log the training loss, learning rate, tokens/s and validation loss to TensorBoard (in --out's "
        "tensorboard folder) or Weights & Biases (offline unless WANDB_MODE or WANDB_API_KEY is set; docs/training.md)",
        "none",
    )
    logging_steps: int = option(
        "--report-to: log the training values every this many optimizer steps (metrics.csv has every step)",
        10,
        at_least=1,
    )
    resume: bool = option("go on from the last checkpoint in --out, if any (--no-resume starts over)", True)
    on_bad_row: Literal["error", "skip"] = option(
        "a bad data row (or image) stops the run naming it, or is left out and counted in the report", "error"
    )

    def __post_init__(self):
        super().__post_init__()
        from ..data import reading  # loads `datasets`, which the flags (`train --help`) need not wait for

        reading.parse_columns(self.columns)  # a malformed mapping stops the run before anything loads
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


def check_joint_training(adapter_cfg: AdapterConfig, visual_cfg: VisualConfig) -> None:
    """Refuse --image-data where there is no image side to train apart."""
    if not methods.get(adapter_cfg.method).trains_jointly or not visual_cfg.clip_model:
        able = " or ".join(methods.with_capability("trains_jointly"))
        raise ValueError(
            "--image-data trains a multimodal adapter's image side apart from its text side: it needs --method "
            f"{able} and --clip-model (got --method {adapter_cfg.method}"
            f"{'' if visual_cfg.clip_model else ' and no --clip-model'})"
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
