"""The `llama-adapter` command: train, eval, chat, demo, convert, merge and adapters. Each maps its flags onto config
dataclasses.

A command imports what it runs on (torch, transformers, Gradio, ...) when it runs, not before: `--help`, `--version`
and a mistyped flag answer at once, and `train --help` needs only the config classes.
"""

import argparse
import importlib.metadata
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import files
from .config import (
    DEFAULT_BASE,
    BaseModelConfig,
    Checked,
    DemoConfig,
    DistributedConfig,
    ModelConfig,
    SamplingConfig,
    ScienceQAConfig,
    ServeConfig,
    VisualConfig,
    add_arguments,
    flat_dict,
    from_arguments,
    option,
)
from .methods import AdapterConfig
from .train import launch
from .train.config import TrainConfig


@dataclass
class ChatConfig(Checked):
    """Who answers, and what to ask about besides the instruction."""

    adapter: str | None = option(
        "adapter folder or shelf name, e.g. alpaca (`llama-adapter adapters`; default: the base model alone)", None
    )
    input: str = option("optional context for the instruction (the Alpaca 'input' field)", "")
    image: str | None = option("an image file the instruction is about (multimodal adapters)", None)


class _Parser(argparse.ArgumentParser):
    """A bad flag gets one line, like every other error of the command, and exit status 1."""

    def error(self, message: str):
        sys.exit(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with `command`, only that command gets its flags (none does for any other word):
    the modules of the other commands' configs are not imported. What `main` parses with."""
    parser = _Parser(prog="llama-adapter", description="LLaMA-Adapter for Hugging Face LLaMA models")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {importlib.metadata.version('llama-adapter')}"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune an adapter on Alpaca-format data")
    if command in (None, "train"):
        for config_class in (TrainConfig, AdapterConfig, VisualConfig, ScienceQAConfig, DistributedConfig):
            add_arguments(train, config_class)

    evaluate = commands.add_parser("eval", help="answer a benchmark's questions, print and save its table")
    if command in (None, "eval"):
        _add_benchmarks(evaluate)

    chat = commands.add_parser("chat", help="answer an instruction, or chat interactively without one")
    if command in (None, "chat"):
        chat.add_argument("instruction", nargs="?", help="the instruction; omit it for an interactive session")
        for config_class in (ModelConfig, ChatConfig, SamplingConfig):
            add_arguments(chat, config_class)

    demo = commands.add_parser("demo", help="the chat demo in your browser (Gradio), text and images")
    if command in (None, "demo"):
        add_arguments(demo, DemoConfig)
        add_arguments(demo, ModelConfig)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP API over the adapters, batched")
    if command in (None, "serve"):
        add_arguments(serve, ServeConfig)
        add_arguments(serve, ModelConfig)

    convert = commands.add_parser(
        "convert", help="an official LLaMA-Adapter v1 release checkpoint (.pth) as ours; v1 to or from PEFT's format"
    )
    if command in (None, "convert"):
        from .convert import ConvertConfig

        add_arguments(convert, ConvertConfig)

    merge = commands.add_parser(
        "merge", help="fold a LoRA adapter, or V2's biases, scales and norms, into a plain Hugging Face model folder"
    )
    if command in (None, "merge"):
        from .merge import MergeConfig

        add_arguments(merge, MergeConfig)
        add_arguments(merge, BaseModelConfig)  # it writes weights: they keep full precision unless asked

    commands.add_parser("adapters", help="list the trained adapters that ship with llama-adapter (the shelf)")
    return parser


def _add_benchmarks(evaluate: argparse.ArgumentParser) -> None:
    from .evaluation.predict import BENCHMARK_DEFAULTS, EvalConfig

    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True)
    for benchmark, question_config in eval_questions().items():
        parser = benchmarks.add_parser(benchmark, help=BENCHMARK_HELP[benchmark])
        for config_class in (EvalConfig, question_config, ModelConfig):
            add_arguments(parser, config_class, BENCHMARK_DEFAULTS[benchmark])
        if benchmark == "scienceqa":
            add_arguments(parser, ScienceQAConfig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    check_arguments_are_text(argv)
    args = build_parser(argv[0] if argv else "").parse_args(argv)
    args.argv = argv
    try:
        HANDLERS[args.command](args)
    except (ValueError, OSError, ModuleNotFoundError, launch.ProcessFailed, *_own_errors(args.command)) as err:
        # One line, once: of several training processes, the first to fail tells it (train/launch.py).
        launch.hand_over(error_text(err))
        sys.exit(f"llama-adapter {args.command}: error: {error_text(err)}" if launch.speaks() else 1)
    except KeyboardInterrupt:
        # Ctrl-C: what was saved stays saved (a training run goes on from its last checkpoint when started again).
        if launch.speaks():
            resumes = "; the same command goes on from the last checkpoint" if args.command == "train" else ""
            print(f"\nllama-adapter {args.command}: interrupted{resumes}", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except Exception as err:
        # Of several training processes, a failure in one stops the others in their next collective call: the first
        # failure's traceback is told once, by the command that launched them.
        if not launch.hand_over("".join(traceback.format_exception(err)).rstrip()):
            raise
        sys.exit(1)


def _own_errors(command: str) -> tuple[type[Exception], ...]:
    """A command's own failures that are said in one line, besides bad input: a training run that cannot go on."""
    if command != "train":
        return ()
    from .train.loop import TrainingStopped  # imported when an error is to be told: it loads torch

    return (TrainingStopped,)


INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)


def check_arguments_are_text(argv: list[str]) -> None:
    """Refuse an argument that is not UTF-8 (Python keeps its bytes as lone surrogates, which no tokenizer, JSON
    file or log can take), naming the flag it belongs to."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            flag = arg.split("=", 1)[0] if arg.startswith("--") else None
            if flag is None and i and argv[i - 1].startswith("--"):
                flag = argv[i - 1]
            named = flag or f"argument {i + 1}"
            shown = arg.encode("utf-8", "backslashreplace").decode()
            command = f" {argv[0]}" if argv[0] in HANDLERS else ""
            sys.exit(f"llama-adapter{command}: error: {named}: '{shown}' is not UTF-8 text")


def error_text(err: Exception) -> str:
    """The one line a failure gets: ours already name their file or flag; the operating system's get the path."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def eval_questions() -> dict[str, type]:
    """eval <benchmark>: the config of the questions it asks beside EvalConfig."""
    from .evaluation.predict import DatasetsConfig, ScienceQATestConfig

    return {"scienceqa": ScienceQATestConfig, "math": DatasetsConfig, "commonsense": DatasetsConfig}


BENCHMARK_HELP = {
    "scienceqa": "ScienceQA's multiple-choice questions, with or without images",
    "math": "LLM-Adapters' math word problems: GSM8K, SVAMP, AQuA, ...",
    "commonsense": "LLM-Adapters' commonsense questions: BoolQ, PIQA, ...",
}


def run_train(args: argparse.Namespace) -> None:
    cfg, visual, dist = (from_arguments(c, args) for c in (TrainConfig, VisualConfig, DistributedConfig))
    if dist.nproc > 1 and not launch.launched():
        # Each process runs this command again under torchrun, which would take --nproc for its own --nproc-per-node.
        sys.exit(launch.launch(dist.nproc, without_option(args.argv[1:], "--nproc")))
    from .train.loop import train

    sqa = from_arguments(ScienceQAConfig, args)
    summary = train(cfg, from_arguments(AdapterConfig, args), visual_cfg=visual, sqa_cfg=sqa, fsdp=dist.fsdp)
    if launch.is_main_process():
        print(json.dumps(summary, indent=2))


def trained_targets(adapter: str | None) -> dict:
    """How the adapter's training targets were written (`TrainConfig.explanation` and `answer_form`), as the run's
    train_config.json beside it says; ScienceQA's plain targets for the base alone or an adapter without one."""
    from . import shelf
    from .train.resume import settings_of_today

    saved = None if adapter is None else shelf.resolve(adapter) / "train_config.json"
    settings = settings_of_today(files.read_json(saved)) if saved is not None and saved.is_file() else {}
    return {"explanation": settings.get("explanation", "none"), "answer_form": settings.get("answer_form", "letter")}


def run_eval(args: argparse.Namespace) -> None:
    from . import shelf
    from .evaluation import llm_adapters, scienceqa
    from .evaluation.predict import EvalConfig, evaluate_problems, evaluate_questions, load_eval_problems, write_scores
    from .serving.models import load_model

    cfg, model_cfg = from_arguments(EvalConfig, args), from_arguments(ModelConfig, args)
    test = from_arguments(eval_questions()[args.benchmark], args)
    adapter = None if cfg.adapter is None else shelf.identity(cfg.adapter)  # as recorded: the same from any folder
    out = Path(cfg.out)
    files.check_can_write(out, "--out", folder=False)
    if args.benchmark == "scienceqa":
        sqa = from_arguments(ScienceQAConfig, args)
        problems = load_eval_problems(cfg, test, sqa.problems, sqa.splits, sqa.missing_images)
        official = Path(cfg.data, sqa.problems).is_file()  # else the hub's layout, which has no problems file
        where = (
            f"{cfg.data}/{sqa.problems}"
            if official
            else cfg.data + (f" ({test.data_config})" if test.data_config else "")
        )
        settings = {"questions": test.llava or f"{where}:{test.split}", "adapter": adapter}
        settings |= flat_dict(model_cfg)
        model = load_model(model_cfg, cfg.adapter)
        with own(out):
            scores = evaluate_problems(
                model, problems, cfg.out, test.scoring, cfg.batch_size, sqa.image_context, cfg.max_new_tokens, settings,
                **trained_targets(cfg.adapter),
            )  # fmt: skip
        print(f"ScienceQA, {scores['count']['Avg']} questions, scoring: {test.scoring}, unparsed: {scores['unparsed']}")
        print(scienceqa.format_table(scores))
    else:  # math, commonsense: the same loop; the test set decides how an answer is read
        questions = llm_adapters.load_questions(cfg.data, test.datasets, cfg.limit)
        settings = {"data": cfg.data, "adapter": adapter} | flat_dict(model_cfg)
        model = load_model(model_cfg, cfg.adapter)
        with own(out):
            scores = evaluate_questions(
                model, questions, cfg.out, test.datasets, cfg.batch_size, cfg.max_new_tokens, settings
            )
        unparsed = sum(scores["unparsed"].values())
        print(f"{args.benchmark.capitalize()} accuracy (%), {len(questions)} questions, unparsed: {unparsed}")
        print(llm_adapters.format_table(scores))
    path = write_scores(scores, cfg.out)
    print(f"predictions: {cfg.out}; scores: {path}")


def own(predictions: Path):
    """One evaluation at a time appends to a predictions file: a second one would write its answers twice."""
    predictions.parent.mkdir(parents=True, exist_ok=True)
    return files.held(predictions.with_name(f".{predictions.name}.lock"), f"--out {predictions}")


def run_chat(args: argparse.Namespace) -> None:
    from .serving.generation import stream_conversation
    from .serving.models import load_model

    cfg = from_arguments(ChatConfig, args)
    sampling = from_arguments(SamplingConfig, args)
    if args.instruction is None and (sys.stdin is None or sys.stdin.closed):
        raise ValueError('standard input is closed: give the instruction as an argument, llama-adapter chat "..."')
    model = load_model(from_arguments(ModelConfig, args), cfg.adapter)
    if args.instruction is not None:
        show(model.stream(args.instruction, cfg.input, sampling, cfg.image))
        return
    about = f" about {cfg.image}" if cfg.image else ""
    print(f"Interactive chat{about}: type an instruction, an empty line or Ctrl-D to quit; Ctrl-C stops an answer.")
    earlier: list[tuple[str, str]] = []  # the conversation so far: each answer sees the exchanges before it
    while True:
        try:
            instruction = input("> ").strip()
        except EOFError:
            break
        if not instruction:
            break
        try:
            pieces, left_out = stream_conversation(model, earlier, instruction, sampling, cfg.image)
        except ValueError as err:  # this message alone is refused; the conversation goes on
            print(f"[refused: {err}]", file=sys.stderr)
            continue
        if left_out:
            print(f"[the context is full: the {left_out} oldest exchange(s) are left out of the prompt]")
        try:
            earlier.append((instruction, show(pieces)))
        except KeyboardInterrupt:
            print("\n[stopped]")


def run_demo(args: argparse.Namespace) -> None:
    from .serving.demo import build_app, launch, load_choices

    cfg = from_arguments(DemoConfig, args)
    launch(build_app(load_choices(from_arguments(ModelConfig, args), cfg.adapter)), cfg)


def run_serve(args: argparse.Namespace) -> None:
    from .serving.api import serve
    from .serving.models import load_models

    cfg, model_cfg = from_arguments(ServeConfig, args), from_arguments(ModelConfig, args)
    serve(load_models(model_cfg, cfg.adapter, model_cfg.base or DEFAULT_BASE), cfg)


def run_convert(args: argparse.Namespace) -> None:
    from .convert import ConvertConfig, convert_checkpoint

    cfg = from_arguments(ConvertConfig, args)
    files.check_can_write(cfg.out, "--out", folder=True)
    print(convert_checkpoint(cfg))


def run_merge(args: argparse.Namespace) -> None:
    from .merge import MergeConfig, merge

    merge(from_arguments(MergeConfig, args), from_arguments(BaseModelConfig, args))


def run_adapters(args: argparse.Namespace) -> None:
    """A header, then one line per shelf adapter: its name (what --adapter takes), method, base, parameters and what
    it is for, in columns as wide as their longest entry."""
    from . import shelf

    rows = [shelf.describe(name) for name in shelf.names()]
    if not rows:
        print("The shelf is empty: no trained adapter ships with this installation.")
        return
    header = {column: column for column in ("name", "method", "base", "parameters", "for")}
    cells = [header, *(row | {"parameters": f"{row['parameters']:,}"} for row in rows)]
    width = {column: max(len(cell[column]) for cell in cells) for column in ("name", "method", "base", "parameters")}
    for cell in cells:
        print(
            f"{cell['name']:<{width['name']}}  {cell['method']:<{width['method']}}  {cell['base']:<{width['base']}}  "
            f"{cell['parameters']:>{width['parameters']}}  {cell['for']}"
        )


HANDLERS = {
    "train": run_train,
    "eval": run_eval,
    "chat": run_chat,
    "demo": run_demo,
    "serve": run_serve,
    "convert": run_convert,
    "merge": run_merge,
    "adapters": run_adapters,
}


def without_option(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag VALUE` and `flag=VALUE`."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == flag:
            skip_value = True
        elif not arg.startswith(flag + "="):
            kept.append(arg)
    return kept


def show(pieces) -> str:
    """Print an answer as it streams in; returns it whole."""
    answer = []
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
            answer.append(piece)
    finally:
        pieces.close()
    print()
    return "".join(answer)


if __name__ == "__main__":
    main()
