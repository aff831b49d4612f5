"""The `llama-adapter` command: train and chat. Each subcommand maps its flags onto config dataclasses."""

import argparse
import json
import sys
from dataclasses import dataclass

from .config import (
    PRECISIONS,
    AdapterConfig,
    SamplingConfig,
    VisualConfig,
    add_arguments,
    default_precision,
    from_arguments,
    option,
)
from .hf import DEFAULT_BASE
from .model import LlamaAdapterModel
from .train import TrainConfig, train


@dataclass
class ChatConfig:
    """Which model answers."""

    adapter: str | None = option("adapter folder (default: the base model with no adapter)", None)
    base: str | None = option(f"base model (default: the one the adapter names, else {DEFAULT_BASE})", None)
    precision: str | None = option("fp32 or bf16 (default: bf16 on a CUDA GPU, else fp32)", None)
    input: str = option("optional context for the instruction (the Alpaca 'input' field)", "")
    image: str | None = option("an image file the instruction is about (multimodal adapters)", None)
    clip_weights: str | None = option(
        "this machine's copy of the CLIP weights a multimodal adapter was trained with", None
    )

    def __post_init__(self):
        self.precision = self.precision or default_precision()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-adapter", description="LLaMA-Adapter for Hugging Face LLaMA models")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune an adapter on Alpaca-format data")
    add_arguments(train, TrainConfig)
    add_arguments(train, AdapterConfig)
    add_arguments(train, VisualConfig)

    chat = commands.add_parser("chat", help="answer an instruction, or chat interactively without one")
    chat.add_argument("instruction", nargs="?", help="the instruction; omit it for an interactive session")
    add_arguments(chat, ChatConfig)
    add_arguments(chat, SamplingConfig)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            run_train(args)
        else:
            run_chat(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        sys.exit(f"llama-adapter {args.command}: error: {err}")


def run_train(args: argparse.Namespace) -> None:
    summary = train(
        from_arguments(TrainConfig, args),
        from_arguments(AdapterConfig, args),
        visual_cfg=from_arguments(VisualConfig, args),
    )
    print(json.dumps(summary, indent=2))


def run_chat(args: argparse.Namespace) -> None:
    cfg = from_arguments(ChatConfig, args)
    sampling = from_arguments(SamplingConfig, args)
    dtype = PRECISIONS[cfg.precision]
    if cfg.adapter:
        model = LlamaAdapterModel.load(cfg.adapter, base=cfg.base, dtype=dtype, clip_weights=cfg.clip_weights)
    else:
        # A fresh adapter has zero gates, so this is exactly the base model.
        model = LlamaAdapterModel.from_base(cfg.base or DEFAULT_BASE, dtype=dtype)
    if args.instruction is not None:
        answer(model, args.instruction, cfg.input, sampling, cfg.image)
        return
    about = f" about {cfg.image}" if cfg.image else ""
    print(f"Interactive chat{about}: type an instruction, an empty line or Ctrl-D to quit; Ctrl-C stops an answer.")
    while True:
        try:
            instruction = input("> ").strip()
        except EOFError:
            break
        if not instruction:
            break
        try:
            answer(model, instruction, "", sampling, cfg.image)
        except KeyboardInterrupt:
            print("\n[stopped]")


def answer(model: LlamaAdapterModel, instruction: str, input: str, sampling: SamplingConfig, image: str | None) -> None:
    pieces = model.stream(instruction, input, sampling, image)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    finally:
        pieces.close()
    print()


if __name__ == "__main__":
    main()
