"""ScienceQA's scores: accuracy in the official nine columns, a pure function of the prediction records."""

from collections.abc import Iterable

import numpy as np

from .problems import LETTERS, SUBJECTS, Problem
from .prompts import parse_answer, parse_option_text

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
PREDICTION_FIELDS = ("pid", "prompt", "output", "pred", "pred_letter", "answer", "correct")


def prediction_record(problem: Problem, prompt: str, output: str, answer_form: str = "letter") -> dict:
    """The record of one generated answer: the raw output, its parse (by letter, or by the option's text), and
    whether it is right."""
    if answer_form == "text":
        pred = parse_option_text(output, problem.choices)
    else:
        pred = parse_answer(output, len(problem.choices))
    return {
        "pid": problem.pid,
        "prompt": prompt,
        "output": output,
        "pred": pred,
        "pred_letter": LETTERS[pred] if pred is not None else None,
        "answer": problem.answer,
        "correct": pred == problem.answer,
    }


def _columns_of(problem: Problem) -> list[str]:
    """The score columns a problem counts in, by ScienceQA's official definitions."""
    columns = ["Avg"]
    if problem.subject is not None:
        columns.append(SUBJECTS[problem.subject])
    if problem.hint:
        columns.append("TXT")
    if problem.names_image:
        columns.append("IMG")
    if not problem.hint and not problem.names_image:
        columns.append("NO")
    if problem.grade is not None:
        columns.append("G1-6" if int(problem.grade.removeprefix("grade")) <= 6 else "G7-12")
    return columns


def score(records: Iterable[dict], problems_by_pid: dict[str, Problem]) -> dict:
    """Accuracy in percent per column (None for a column with no problems), "count" per column, and "unparsed".

    A record whose "correct" disagrees with its "pred" and the problem's answer was made against other problems
    (a different problems file), so it is an error rather than a number to average.
    """
    return _percent_by_column(_credits(records, problems_by_pid))


def bootstrap_intervals(
    records: Iterable[dict], problems_by_pid: dict[str, Problem], resamples: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float] | None]:  # fmt: skip
    """Each column's percentile-bootstrap confidence interval, in percent (None for a column with no problems).

    The problems are drawn with replacement `resamples` times and every column is scored on each draw, so a
    column's interval reflects how few problems it has: on ScienceQA's 361 problems with metadata, an accuracy
    near 50 is known to about +-5 points.
    """
    credits = _credits(records, problems_by_pid)
    correct = np.array([credit for _, credit, _ in credits])
    member = np.array([[column in _columns_of(problem) for column in COLUMNS] for problem, _, _ in credits])
    draws = np.random.default_rng(seed).integers(0, len(credits), size=(resamples, len(credits)))
    columns = [i for i in range(len(COLUMNS)) if member[:, i].any()]
    member = member[:, columns]
    counts = member[draws].sum(axis=1)  # (resamples, columns with problems)
    hits = np.einsum("rn,rnc->rc", correct[draws], member[draws])
    with np.errstate(invalid="ignore", divide="ignore"):  # a small column may be missing from a draw
        accuracy = np.where(counts > 0, 100 * hits / counts, np.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(accuracy, [tail, 100 - tail], axis=0)
    intervals = {COLUMNS[i]: (float(lo), float(hi)) for i, lo, hi in zip(columns, low, high)}
    return {column: intervals.get(column) for column in COLUMNS}


def bootstrap_difference(
    records: Iterable[dict], baseline: Iterable[dict], problems_by_pid: dict[str, Problem], resamples: int = 1000,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:  # fmt: skip
    """The percentile-bootstrap interval of Avg(`records`) - Avg(`baseline`) in points, both answering the same
    problems, drawn together (paired): where two models mostly agree, far narrower than their two intervals."""
    ours = {problem.pid: credit for problem, credit, _ in _credits(records, problems_by_pid)}
    theirs = {problem.pid: credit for problem, credit, _ in _credits(baseline, problems_by_pid)}
    if ours.keys() != theirs.keys():
        raise ValueError(f"the two predictions answer different problems ({len(ours)} and {len(theirs)})")
    gain = np.array([ours[pid] - theirs[pid] for pid in ours])
    draws = np.random.default_rng(seed).integers(0, len(gain), size=(resamples, len(gain)))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(100 * gain[draws].mean(axis=1), [tail, 100 - tail])
    return float(low), float(high)


def _credits(records: Iterable[dict], problems_by_pid: dict[str, Problem]) -> list[tuple[Problem, float, bool]]:
    """(problem, 1.0 if right else 0.0, unparsed) of each record, checked against the problems."""
    credits = []
    seen = set()
    for record in records:
        pid = record["pid"]
        if pid in seen:
            raise ValueError(f"pid {pid} has more than one prediction")
        seen.add(pid)
        if pid not in problems_by_pid:
            raise ValueError(f"prediction for pid {pid} has no problem")
        problem = problems_by_pid[pid]
        if record["correct"] != (record["pred"] == problem.answer):
            raise ValueError(
                f"prediction for pid {pid}: correct={record['correct']} but pred={record['pred']} "
                f"and the answer is {problem.answer}"
            )
        credits.append((problem, float(record["correct"]), record["pred"] is None))
    if not credits:
        raise ValueError("nothing to score: no prediction of any of these problems")
    return credits


def chance(problems: Iterable[Problem]) -> dict:
    """What guessing uniformly among each problem's options scores on average, in `score`'s shape.

    Options number 2 to 5, so chance differs between subsets; a table row for it makes that visible.
    """
    return _percent_by_column((problem, 1 / len(problem.choices), False) for problem in problems)


def _percent_by_column(credits: Iterable[tuple[Problem, float, bool]]) -> dict:
    """Accuracy per column in percent; nothing to average is an error, never a 0 or a blank that reads as one."""
    total = dict.fromkeys(COLUMNS, 0.0)
    count = dict.fromkeys(COLUMNS, 0)
    unparsed = 0
    for problem, credit, was_unparsed in credits:
        unparsed += was_unparsed
        for column in _columns_of(problem):
            count[column] += 1
            total[column] += credit
    if not count["Avg"]:
        raise ValueError("nothing to score: no prediction of any of these problems")
    accuracy = {c: 100 * total[c] / count[c] if count[c] else None for c in COLUMNS}
    return accuracy | {"count": count, "unparsed": unparsed}


def format_table(scores: dict) -> str:
    """A markdown table, header and one row, of the 9 columns; '-' for a column with no problems."""
    cells = ["-" if scores[c] is None else f"{scores[c]:.2f}" for c in COLUMNS]
    return "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS), "| " + " | ".join(cells) + " |"])
