"""Likelihood scoring of ScienceQA's 4,241 test questions (LLaVA's copy) with the shelf's `scienceqa` adapter, as the
README's evaluation line asks it, in this machine's default precision; and, on the first --check questions, the
same answers one question at a time (the batch changes nothing) and in the other precision.

    python bench/scienceqa_scoring.py           # writes bench/results/scienceqa_scoring.json

Each run is `llama-adapter eval scienceqa ... --scoring likelihood` in this process, timed from the command's start
(the model's loading included) to its scores, into a fresh predictions file.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import DATA, RESULTS, write_results

from llama_adapter import cli
from llama_adapter.config import default_precision

SCIENCEQA = DATA / "scienceqa"
ASKED = [
    "eval", "scienceqa", "--data", str(SCIENCEQA), "--llava", str(SCIENCEQA / "llava_test_CQM-A.json"),
    "--adapter", "scienceqa", "--image-context", "captions", "--missing-images", "text-only", "--scoring", "likelihood",
]  # fmt: skip
GOALS = {"all_test_minutes": 15.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N questions (default: all)")
    parser.add_argument("--check", type=int, default=200, help="questions asked again one at a time and in fp32/bf16")
    parser.add_argument("--out", default=str(RESULTS / "scienceqa_scoring.json"))
    args = parser.parse_args()

    precision = default_precision(answering=True)
    other = "fp32" if precision == "bf16" else "bf16"
    with tempfile.TemporaryDirectory() as folder:
        runs = {
            "all": scored(Path(folder) / "all.jsonl", ["--limit", str(args.limit)] if args.limit else []),
            "one_at_a_time": scored(Path(folder) / "one.jsonl", ["--limit", str(args.check), "--batch-size", "1"]),
            other: scored(Path(folder) / "other.jsonl", ["--limit", str(args.check), "--precision", other]),
        }
    check = runs["one_at_a_time"]["predictions"]
    first = {pid: pred for pid, pred in runs["all"]["predictions"].items() if pid in check}
    results = {
        "precision": precision,  # the answering default, which write_results would otherwise take for training's
        "questions": runs["all"]["questions"],
        "seconds": runs["all"]["seconds"],
        "questions_per_s": runs["all"]["questions"] / runs["all"]["seconds"],
        "accuracy": runs["all"]["accuracy"],
        "batch_size": 8,
        "check": {
            "questions": len(check),
            "same_as_one_at_a_time": sum(first[pid] == pred for pid, pred in check.items()),
            f"same_as_{other}": sum(first[pid] == pred for pid, pred in runs[other]["predictions"].items()),
            f"accuracy_{precision}": sum(
                first[pid] == answer for pid, answer in runs["one_at_a_time"]["answers"].items()
            )
            / len(check),
            f"accuracy_{other}": runs[other]["accuracy"],
            "seconds_one_at_a_time": runs["one_at_a_time"]["seconds"],
            f"seconds_{other}": runs[other]["seconds"],
        },
        "goals": GOALS,
    }
    print(json.dumps(results, indent=2))
    write_results(results, args.out)


def scored(out: Path, flags: list[str]) -> dict:
    """Time one `eval scienceqa` run into `out`: its questions, seconds, accuracy, predictions and right answers."""
    start = time.perf_counter()
    cli.main([*ASKED, "--out", str(out), *flags])
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {
        "questions": len(records),
        "seconds": seconds,
        "accuracy": sum(record["correct"] for record in records) / len(records),
        "predictions": {record["pid"]: record["pred"] for record in records},
        "answers": {record["pid"]: record["answer"] for record in records},
    }


if __name__ == "__main__":
    main()
