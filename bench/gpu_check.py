"""Combine what scripts/gpu_check.sh measured into one results file and a short markdown summary.

    python bench/gpu_check.py --scratch DIR --device "NVIDIA H200" --model llama-7b     # as gpu_check.sh calls it

Reads, from --scratch, each step's exit status and times (NAME.status, written by gpu_check.sh), its output
(NAME.out, NAME.err), the benchmarks' results (train_step.json, finetune.json, generation.json, quantize.json) and
pytest's junit XML (pytest.xml). Writes gpu_<device>.json and gpu_<device>.md into --out-dir (default
bench/results), <device> from the GPU's name (NVIDIA H200 -> gpu_nvidia_h200); a --dry-run writes
gpu_dryrun_cpu.json and .md. The JSON holds the headline numbers, the goal and how far it is missed, every step's
status, the end of the stderr of each step that failed, and the benchmarks' own results whole.

A step that failed, ran out of time or was skipped is recorded as such and the numbers of the others are kept: a
partial result is still worth committing. So this script reads files with the standard library alone, and never
imports torch: it runs, and writes what there is, even where the steps broke because CUDA or a package did.
"""

import argparse
import json
import re
import subprocess
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("pytest", "train_step", "finetune", "generation", "quantize")
BENCHMARKS = STEPS[1:]
GOAL = {
    "statement": "Alpaca-52K x 5 epochs of LLaMA-7B under 30 minutes on one H100 (about 16,000 tokens/s, ~45% MFU)",
    "minutes": 30,
    "tokens_per_s": 16_000,
    "mfu": 0.45,
}
TAIL_CHARS = 3000  # of a failed step's stderr, kept in the results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", required=True, help="the folder gpu_check.sh ran the steps in")
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    parser.add_argument("--device", required=True, help="the GPU's name, as torch.cuda.get_device_name() gives it")
    parser.add_argument("--model", required=True, help="the model the benchmarks ran on")
    parser.add_argument("--wall-s", type=float, required=True, help="seconds the steps took, all together")
    parser.add_argument("--dry-run", action="store_true", help="the CPU dry run: results named gpu_dryrun_cpu")
    args = parser.parse_args()

    results = combine(Path(args.scratch), args.device, args.model, args.dry_run, args.wall_s)
    out = Path(args.out_dir) / f"gpu_{'dryrun_cpu' if args.dry_run else slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    summary = markdown(results)
    out.with_suffix(".md").write_text(summary)
    print(summary)
    print(f"Results: {out}\nSummary: {out.with_suffix('.md')}")


def slug(device: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200': the device's name as a file name."""
    return re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")


def combine(scratch: Path, device: str, model: str, dry_run: bool, wall_s: float) -> dict:
    """Everything the run found out, as one JSON-ready dict."""
    steps = {name: step_record(scratch, name) for name in STEPS}
    raw = {name: read_json(scratch / f"{name}.json") for name in BENCHMARKS}
    for name, results in raw.items():
        if steps[name]["status"] == "ok" and results is None:
            steps[name] |= {"status": "failed", "why": f"exit status 0, but it wrote no {name}.json"}
    headlines, errors = {}, {}
    for name, read in HEADLINES.items():
        if raw[name] is None:
            continue
        try:
            headlines[name] = read(raw[name])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # a results file of another shape
            errors[name] = f"{type(err).__name__}: {err}"
    if "finetune" in headlines:
        headlines["alpaca52k_x5"] = projection(headlines["finetune"])
    tests = test_counts(scratch / "pytest.xml")
    if tests is None:
        steps["pytest"].setdefault("why", "no junit XML: pytest did not finish")
    versions = next((r for r in raw.values() if r and "torch" in r), {})
    results = {
        "command": "bash scripts/gpu_check.sh" + (" --dry-run" if dry_run else ""),
        "device": device,
        "dry_run": dry_run,
        "model": model,
        "precision": versions.get("precision"),
        "torch": versions.get("torch"),
        "commit": git_commit(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps_wall_s": wall_s,
        "steps": steps,
        "tests": tests,
        "headline": headlines,
        "goal": judge_goal(headlines, raw["train_step"], model),
    }
    if errors:
        results["headline_errors"] = errors
    results["raw"] = raw
    return results


# ----------------------------------------------------------------------------------------------------------
# What each step left behind


def step_record(scratch: Path, name: str) -> dict:
    """status (ok, failed, timed out, skipped, not run), exit status, wall and limit seconds, command; the end of
    stderr (and of stdout, for pytest, which reports failures there) when it did not end well."""
    status_file = scratch / f"{name}.status"
    if not status_file.is_file():
        return {"status": "not run"}
    fields = dict(line.split("=", 1) for line in status_file.read_text().splitlines() if "=" in line)
    record = {"command": read_text(scratch / f"{name}.command").strip(), "limit_s": int(fields["limit_s"])}
    if fields["rc"] == "skipped":
        return {"status": "skipped", "why": f"only {fields['limit_s']} s of the budget were left"} | record
    rc = int(fields["rc"])
    wall = float(fields["end"]) - float(fields["start"])
    # timeout(1) exits 124 when its limit stops the command, 137 when the KILL that follows a TERM was needed.
    timed_out = rc == 124 or (rc == 137 and wall >= record["limit_s"])
    status = "ok" if rc == 0 else "timed out" if timed_out else "failed"
    record = {"status": status, "rc": rc, "wall_s": round(wall, 1)} | record
    if status != "ok":
        record["stderr_tail"] = read_text(scratch / f"{name}.err")[-TAIL_CHARS:]
        if name == "pytest":
            record["stdout_tail"] = read_text(scratch / f"{name}.out")[-TAIL_CHARS:]
    return record


def test_counts(junit: Path) -> dict | None:
    """passed, failed, errors, skipped and the failed tests' names and messages, from pytest's junit XML."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):  # not written, or cut off by a timeout
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {
        key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    failed = {}
    for case in root.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed[f"{case.get('classname')}::{case.get('name')}"] = (problem.get("message") or "")[:500]
    return {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failures": failed,
    }


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut off by a timeout while it was written
        return None


def read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def git_commit() -> str | None:
    """The commit checked out, with '+changes' if the tracked files differ from it; None without git or history."""

    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        except OSError:  # no git on this machine
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    return commit and commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


# ----------------------------------------------------------------------------------------------------------
# The headline numbers of each benchmark


def train_step_headline(raw: dict) -> dict:
    methods = {
        method: {
            "tokens_per_s": numbers["tokens_per_s"],
            "mfu": numbers.get("mfu"),  # GPUs only: a CPU has no peak FLOP/s to compare with
            "peak_memory_mib": peak(numbers["peak_memory_mib"]),
        }
        for method, numbers in raw["methods"].items()
    }
    ratios = ("ours_over_floor", "peft_over_ours", "compiled_over_ours", "compiled_first_loss_difference")
    return {"batch": raw["batch"], "methods": methods} | {key: raw[key] for key in ratios if key in raw}


def peak(memory) -> float | None:
    """A peak in MiB: CUDA's own number, or the median of a CPU run's fresh processes (None: not measured)."""
    return memory["median"] if isinstance(memory, dict) else memory


def finetune_headline(raw: dict) -> dict:
    batchings = {
        batching: {
            "tokens_per_s": numbers["tokens_per_s"],
            "mfu": numbers.get("mfu"),
            "padding_share": numbers["padding_share"],
            "peak_memory_mib": numbers["peak_memory_mib"],
            "alpaca52k_x5_projected_minutes": numbers["alpaca52k_x5_projected_minutes"],
        }
        for batching, numbers in raw["batchings"].items()
    }
    return {
        "batchings": batchings,
        "mean_tokens_per_row": raw["mean_tokens_per_row"],
        "packed_over_grouped": raw.get("packed_over_grouped"),  # only when both ran
    }


def projection(finetune: dict) -> dict:
    """Alpaca-52K x 5 epochs at the faster batching's measured speed."""
    batchings = finetune["batchings"]
    best = min(batchings, key=lambda name: batchings[name]["alpaca52k_x5_projected_minutes"])
    numbers = batchings[best]
    return {
        "projected_minutes": numbers["alpaca52k_x5_projected_minutes"],
        "batching": best,
        "tokens_per_s": numbers["tokens_per_s"],
        "mfu": numbers["mfu"],
    }


def generation_headline(raw: dict) -> dict:
    return {
        batch: {method: summary[method]["tokens_per_s"] for method in ("base", "ours", "peft")}
        | {"ours_over_base": summary["ours_over_base"], "ours_over_peft": summary["ours_over_peft"]}
        for batch, summary in raw["batches"].items()
    }


def quantize_headline(raw: dict) -> dict:
    return {
        row["quantize"]: {
            key: row[key] for key in ("peak_mib", "weights_mib", "train_tokens_per_s", "generation_tokens_per_s")
        }
        for row in raw["measured"]
    }


HEADLINES = {
    "train_step": train_step_headline,
    "finetune": finetune_headline,
    "generation": generation_headline,
    "quantize": quantize_headline,
}


def judge_goal(headlines: dict, train_step: dict | None, model: str) -> dict:
    """Whether the projected Alpaca-52K x 5 run fits the goal; if not, by how much, and where a step's time goes."""
    goal = GOAL | {"applies": model == "llama-7b"}
    if model != "llama-7b":
        goal["note"] = f"measured on the {model} model: the comparison checks the code, not the goal"
    measured = headlines.get("alpaca52k_x5")
    if measured is None:
        return goal | {"met": None, "why": "no fine-tuning numbers: the finetune step did not finish"}
    minutes, mfu = measured["projected_minutes"], measured["mfu"]
    goal |= {"measured": measured, "met": minutes <= GOAL["minutes"]}
    if not goal["met"]:
        goal["missed_by"] = {
            "minutes": minutes - GOAL["minutes"],
            "share_over": minutes / GOAL["minutes"] - 1,
            "speed_needed": minutes / GOAL["minutes"],  # times the measured tokens/s
            "tokens_per_s_below_goal": GOAL["tokens_per_s"] - measured["tokens_per_s"],
            "mfu_below_goal": None if mfu is None else GOAL["mfu"] - mfu,
        }
        profile = (train_step or {}).get("profile_top_ops_ms", {}).get("ours")
        if profile:
            goal["profile_top_ops_ms"] = profile  # one training step of ours, bench/train_step.py --profile
    return goal


# ----------------------------------------------------------------------------------------------------------
# The markdown summary


def markdown(results: dict) -> str:
    head = headline_rows(results["headline"], results["tests"])
    lines = [
        f"# GPU check: {results['device']}, {results['model']}",
        "",
        (
            f"`{results['command']}` at commit {results['commit'] or '(unknown)'}, torch {results['torch']}, "
            f"{results['precision']}, {results['finished']}; the steps took {results['steps_wall_s']:.0f} s."
        ),
        "",
        *goal_lines(results["goal"]),
        "",
        "| measured | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in head),
    ]
    profile = results["goal"].get("profile_top_ops_ms")
    if profile:
        lines += ["", "Where one training step of ours goes (bench/train_step.py --profile, self time):", ""]
        lines += ["| operator × calls | ms |", "|---|---|"]
        lines += [f"| {op.replace(' x', ' × ')} | {ms:,.1f} |" for op, ms in profile.items()]
    lines += ["", "| step | status | s | limit s |", "|---|---|---|---|"]
    for name, step in results["steps"].items():
        why = f" ({step['why']})" if "why" in step else ""
        lines.append(f"| {name} | {step['status']}{why} | {step.get('wall_s', '–')} | {step.get('limit_s', '–')} |")
    for name, step in results["steps"].items():
        for stream in ("stdout_tail", "stderr_tail"):
            if step.get(stream, "").strip():
                tail = "\n".join(step[stream].strip().splitlines()[-15:])
                lines += ["", f"{name}, {step['status']}: the end of its {stream[:6]}", "", "```", tail, "```"]
    for name, error in results.get("headline_errors", {}).items():
        lines += ["", f"{name}: its results could not be read ({error}); they are in the JSON under raw.{name}."]
    return "\n".join(lines) + "\n"


def goal_lines(goal: dict) -> list[str]:
    lines = [f"Goal: {goal['statement']}." + (f" ({goal['note']}.)" if "note" in goal else "")]
    if goal["met"] is None:
        return [*lines, f"Not judged: {goal['why']}."]
    measured = goal["measured"]
    speed = f"{measured['tokens_per_s']:,.0f} tokens/s" + (
        f" at {measured['mfu']:.0%} MFU" if measured["mfu"] is not None else ""
    )
    said = f"projected {measured['projected_minutes']:,.1f} min with {measured['batching']} batches ({speed})"
    if goal["met"]:
        return [*lines, f"**Met**: {said}."]
    missed = goal["missed_by"]
    mfu = "" if missed["mfu_below_goal"] is None else f", MFU {missed['mfu_below_goal']:.0%} below 45%"
    return [
        *lines,
        (
            f"**Missed**: {said}, {missed['minutes']:,.1f} min ({missed['share_over']:.0%}) over 30: it needs "
            f"{missed['speed_needed']:.2f}× this speed{mfu}."
        ),
    ]


def headline_rows(head: dict, tests: dict | None) -> list[tuple[str, str]]:
    """(what, value) rows of the summary table, for the numbers there are."""
    rows = []
    if tests is not None:
        rows.append(
            ("`pytest -m cuda`", ", ".join(f"{tests[k]} {k}" for k in ("passed", "failed", "errors", "skipped")))
        )
    if "alpaca52k_x5" in head:
        best = head["alpaca52k_x5"]
        rows.append(("Alpaca-52K × 5 epochs, projected", f"{best['projected_minutes']:,.1f} min ({best['batching']})"))
    if "finetune" in head:
        batchings = head["finetune"]["batchings"]
        what = f"fine-tuning, {' / '.join(batchings)}"
        rows.append((f"{what}: tokens/s", joined(batchings.values(), "tokens_per_s", count)))
        rows.append((f"{what}: MFU", joined(batchings.values(), "mfu", percent)))
        rows.append((f"{what}: peak memory", joined(batchings.values(), "peak_memory_mib", gib)))
    if "train_step" in head:
        step = head["train_step"]
        what = f"training step {step['batch'][0]} × {step['batch'][1]}, {' / '.join(step['methods'])}"
        rows.append((f"{what}: tokens/s", joined(step["methods"].values(), "tokens_per_s", count)))
        rows.append((f"{what}: MFU", joined(step["methods"].values(), "mfu", percent)))
        rows.append((f"{what}: peak memory", joined(step["methods"].values(), "peak_memory_mib", gib)))
        ratios = f"{step['ours_over_floor']:.3f}×, {step['peft_over_ours']:.3f}×"
        rows.append(("training step time: ours ÷ floor, PEFT ÷ ours", ratios))
        if "compiled_over_ours" in step:
            compiled = f"{step['compiled_over_ours']:.3f}× (first loss differs by {step['compiled_first_loss_difference']:.1e})"
            rows.append(("training step time: torch.compile'd layers ÷ ours", compiled))
    for batch, speeds in head.get("generation", {}).items():
        value = " / ".join(f"{speeds[m]:,.1f}" for m in ("base", "ours", "peft"))
        rows.append((f"generation, batch {batch}, base / ours / PEFT: tokens/s", value))
        ratios = f"{speeds['ours_over_base']:.3f}×, {speeds['ours_over_peft']:.3f}×"
        rows.append((f"generation, batch {batch}: ours ÷ base, ours ÷ PEFT", ratios))
    if "quantize" in head:
        settings = head["quantize"]
        what = f"LLaMA-Adapter training on a {' / '.join(settings)} base"
        rows.append((f"{what}: base weights", joined(settings.values(), "weights_mib", gib)))
        rows.append((f"{what}: peak memory", joined(settings.values(), "peak_mib", gib)))
        rows.append((f"{what}: tokens/s", joined(settings.values(), "train_tokens_per_s", count)))
    return rows


def joined(numbers, key: str, form) -> str:
    """'a / b / c': `key` of each of `numbers`, each as `form` writes it."""
    return " / ".join(form(n[key]) for n in numbers)


def count(value: float) -> str:
    return f"{value:,.0f}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def gib(mib: float | None) -> str:
    return "–" if mib is None else f"{mib / 1024:,.2f} GiB"


if __name__ == "__main__":
    main()
