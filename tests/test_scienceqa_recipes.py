"""Issue 25's ingredients: more science problems (ARC, OpenBookQA) in ScienceQA's shape, targets with the
explanation before or after the answer, likelihood scoring of answer-first targets, and bootstrap intervals."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from test_scienceqa import sqa_dir, text_only  # noqa: F401 - the ScienceQA fixture folder

from llama_adapter import cli
from llama_adapter.data import batching, encoding
from llama_adapter.data.sources import DataError
from llama_adapter.evaluation import scienceqa
from llama_adapter.evaluation.predict import evaluate_problems
from llama_adapter.evaluation.predictions import read_predictions
from llama_adapter.train.resume import settings_of_today

ARC_ROW = {
    "instruction": "Please choose the correct answer to the question: Which gas do plants take in?\n\n"
    "Answer1: oxygen Answer2: carbon dioxide Answer3: helium\n\nAnswer format: answer1/answer2/answer3",
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}


def write_rows(tmp_path, rows, folder="ARC-Easy"):
    path = tmp_path / folder / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def test_a_choice_row_becomes_a_scienceqa_problem_and_prompt(tmp_path):
    five = ARC_ROW | {
        "instruction": "Please choose the correct answer to the question: Pick one.\n\nAnswer1: a Answer2: b "
        "Answer3: c Answer4: d Answer5: an Answer that says e\n\nAnswer format: answer1/answer2/answer3/answer4/"
        "answer5",
        "answer": "answer5",
    }
    problems = scienceqa.load_choice_problems(write_rows(tmp_path, [ARC_ROW, five]))
    assert problems[0] == scienceqa.Problem(
        pid="ARC-Easy:0", question="Which gas do plants take in?", choices=("oxygen", "carbon dioxide", "helium"),
        answer=1, hint="", image=None, names_image=False, subject=None, grade=None, split="train",
    )  # fmt: skip
    assert problems[1].choices == ("a", "b", "c", "d", "an Answer that says e") and problems[1].answer == 4
    assert scienceqa.to_rows(problems[:1]) == [
        {
            "instruction": "Question: Which gas do plants take in?\nOptions: (A) oxygen (B) carbon dioxide (C) helium\n"
            "Answer with the letter of the correct option.",
            "input": "",
            "output": "The answer is B.",
            "image": None,
        }
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (ARC_ROW | {"instruction": "Which gas do plants take in?"}, "field 'instruction' is not"),
        (ARC_ROW | {"answer": "answer4"}, r"field 'answer' is 'answer4', expected one of answer1..answer3"),
        (ARC_ROW | {"answer": "B"}, r"field 'answer' is 'B'"),
        ({"instruction": ARC_ROW["instruction"]}, "string fields 'instruction' and 'answer'"),
        (ARC_ROW | {"instruction": ARC_ROW["instruction"].replace("Answer3", "Answer4")}, "numbered Answer1"),
        (ARC_ROW | {"instruction": ARC_ROW["instruction"].replace("/answer3", "")}, "names answer1/answer2 but"),
        (ARC_ROW | {"instruction": ARC_ROW["instruction"].replace("helium", "")}, "non-empty"),
    ],
    ids=["not a question", "answer past the options", "a letter", "no answer", "skipped number", "format", "empty"],
)
def test_a_bad_choice_row_is_named_by_file_and_row(tmp_path, row, message):
    path = write_rows(tmp_path, [ARC_ROW, row])
    with pytest.raises(DataError, match=rf"ARC-Easy/train\.json: row 1: .*{message}"):
        scienceqa.load_choice_problems(path)


@pytest.mark.parametrize(("content", "message"), [("{}", "expected a JSON list"), ("[]", "no rows"), ("[", "JSON")])
def test_a_bad_choice_file_is_named(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"train\.json: .*{message}"):
        scienceqa.load_choice_problems(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "rows", "options"),
    [("ARC-Easy", 2251, {3: 6, 4: 2241, 5: 4}), ("ARC-Challenge", 1119, {3: 1, 4: 1117, 5: 1}),
     ("openbookqa", 4957, {4: 4957})],
)  # fmt: skip
def test_the_real_train_sets_convert_row_for_row(data_dir, name, rows, options):
    path = data_dir / "llm-adapters" / name / "train.json"
    problems = scienceqa.load_choice_problems(path)
    assert len(problems) == rows
    assert {n: sum(len(p.choices) == n for p in problems) for n in options} == options
    for problem, row in zip(problems, json.loads(path.read_text())):
        assert f"Answer{problem.answer + 1}: {problem.choices[problem.answer]}" in row["instruction"]
        assert row["output"] == f"the correct answer is answer{problem.answer + 1}"


def test_option_targets_follow_the_training_targets(sqa_dir):  # noqa: F811
    _, one, *_ = text_only(sqa_dir)
    assert scienceqa.option_targets(one) == (["The answer is A.", "The answer is B.", "The answer is C."], True)
    targets, whole = scienceqa.option_targets(one, "after")
    assert not whole and targets[1] == "The answer is B.\nBECAUSE:"
    assert scienceqa.answer_text(one, "after").startswith(targets[0])
    with pytest.raises(ValueError, match="score it with generation"):
        scienceqa.option_targets(one, "before")


def test_text_form_targets_name_the_option_by_its_text(sqa_dir):  # noqa: F811
    _, one, *_ = text_only(sqa_dir)
    assert scienceqa.answer_text(one, answer_form="text") == "The answer is Ohio."
    assert scienceqa.answer_text(one, "before", "text").endswith(".\nThe answer is Ohio.")
    assert scienceqa.option_targets(one, "after", "text") == (
        ["The answer is Ohio.\nBECAUSE:", "The answer is Utah.\nBECAUSE:", "The answer is Texas.\nBECAUSE:"],
        False,
    )
    with pytest.raises(ValueError, match="answer_form must be one of"):
        scienceqa.answer_text(one, answer_form="word")
    rows = scienceqa.to_rows([one], answer_form="text")
    assert rows[0]["output"] == "The answer is Ohio." and "(A) Ohio" in rows[0]["instruction"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is cat food.", 1),  # the longest option that fits, not 'cat'
        ("The answer is cat.", 0),
        ("the answer is cat", 0),
        ("The answer is Dear Pablo,.", 2),  # case counts
        ("The answer is dear Pablo,.", 3),
        ("The answer is Love,\nZoe.", 4),  # an option over two lines
        ("The answer is cats.", None),
        ("Because it purrs.\nThe answer is cat.", 0),
        ("The answer is B.", None),  # a letter is no option's text
        ("cat", None),
    ],
)
def test_parse_option_text(text, expected):
    choices = ("cat", "cat food", "Dear Pablo,", "dear Pablo,", "Love,\nZoe")
    assert scienceqa.parse_option_text(text, choices) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The correct answer is cat food.", 1),
        ("the right answer is: cat", 0),
        ("Answer: cat food", 1),
        ("It purrs.\nAnswer: cat.", 0),
        ("The correct answer is (B) cat food.", 1),  # the letter and the text agree
        ("The correct answer is (A) cat food.", None),  # they disagree: no one option
        ("The correct answer is (B).", None),  # a letter is no option's text
        ("Hence the correct answer is cat.\nThe answer is cat food.", 1),  # the trained form first: what it read stays
        ("The wrong answer is cat.", None),
        ("My answer: cat", None),  # "answer:" is only a statement where it opens a line
    ],
)
def test_parse_option_text_reads_the_common_forms_of_an_answer_statement(text, expected):
    choices = ("cat", "cat food", "Dear Pablo,", "dear Pablo,", "Love,\nZoe")
    assert scienceqa.parse_option_text(text, choices) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # What the explanation-before adapter of eval/scienceqa_sweep.py wrote for val problems: each names one
        # option beyond doubt without copying all of it.
        ("The answer is circular reasoning.", 0),  # the option's words before its colon
        ("...a logical fallacy. The answer is circular reasoning. It assumes", 0),
        ("The answer is Rosa's father has brown eyes..", 2),  # the first of the option's two sentences
        ("The answer is the Cape vulture.", 4),  # with an article before it
        ("The answer is below.", None),  # opens two options
        ("The answer is Massachusetts.", None),  # no option at all
        ("The answer is circular.", None),  # a word, not the whole of what comes before the colon
        ("The answer is Rosa's father.", None),
    ],
)
def test_parse_option_text_reads_an_answer_that_names_an_option_by_its_opening(text, expected):
    choices = (
        "circular reasoning: an argument that supports a claim with the claim itself",
        "guilt by association: a negative association intended to discredit someone",
        "Rosa's father has brown eyes. He passed this trait down to Rosa.",
        "Rosa's hair is the same color as her brown eyes.",
        "Cape vulture",
        "below . . . the ground shakes",
        "below . . . the ground gets colder",
    )
    assert scienceqa.parse_option_text(text, choices) == expected


@pytest.mark.parametrize("form", scienceqa.ANSWER_FORMS)
def test_answer_first_scoring_leaves_out_the_eos_the_targets_never_had(
    form,
    make_model,
    randomize_adapter,
    sqa_dir,  # noqa: F811
    tmp_path,
):
    model = make_model(adapter_len=4, adapter_layers=3)
    randomize_adapter(model)
    problems = text_only(sqa_dir)
    evaluate_problems(model, problems, tmp_path / "p.jsonl", "likelihood", explanation="after", answer_form=form)
    records = read_predictions(tmp_path / "p.jsonl")
    for problem in problems:  # each pick is the option whose cut target, with no EOS after it, is most likely
        instruction, input = scienceqa.question_prompt(problem)
        targets, _ = scienceqa.option_targets(problem, "after", form)
        with torch.no_grad():
            scores = []
            for target in targets:
                batch = batching.collate(
                    [
                        encoding.encode(
                            model.tokenizer, {"instruction": instruction, "input": input, "output": target}, 10**4
                        )
                    ],
                    model.tokenizer.pad_token_id,
                )
                batch["labels"][0, -1] = -100  # the EOS encode appends
                scores.append(model.response_logprobs(**batch).item())
        assert records[problem.pid]["pred"] == int(np.argmax(scores))
    with pytest.raises(ValueError, match="score it with generation"):
        evaluate_problems(model, problems, tmp_path / "q.jsonl", scoring="likelihood", explanation="before")
    assert not (tmp_path / "q.jsonl").exists()


def records_with(problems, correct):
    return [
        {"pid": p.pid, "pred": p.answer if right else (p.answer + 1) % len(p.choices), "correct": right}
        for p, right in zip(problems, correct)
    ]


def numbered(problem, count):
    return [dataclasses.replace(problem, pid=str(i)) for i in range(count)]


def test_bootstrap_intervals(sqa_dir):  # noqa: F811
    fixtures = text_only(sqa_dir)
    problems = numbered(fixtures[0], 180) + numbered(
        fixtures[4], 181
    )  # 361 problems: NAT and LAN, grades 1-6, no context
    problems = [dataclasses.replace(p, pid=f"{p.subject}{p.pid}") for p in problems]
    by_pid = {p.pid: p for p in problems}
    correct = [i % 2 == 0 for i in range(180)] + [True] * 181  # NAT half right, LAN all right
    records = records_with(problems, correct)
    intervals = scienceqa.bootstrap_intervals(records, by_pid, seed=0)
    assert intervals == scienceqa.bootstrap_intervals(records, by_pid, seed=0)  # a fixed seed, a fixed interval
    assert intervals != scienceqa.bootstrap_intervals(records, by_pid, seed=1)
    assert intervals["LAN"] == (100.0, 100.0)  # each column from its own problems: LAN's are all right
    assert intervals["SOC"] is None and intervals["TXT"] is None  # no problems there
    point = scienceqa.score(records, by_pid)
    for column in ("NAT", "Avg", "NO", "G1-6"):
        low, high = intervals[column]
        assert low < point[column] < high
    # Close to the normal approximation: 1.96 standard errors either side, in percent.
    half = 100 * 1.96 * math.sqrt(0.5 * 0.5 / 180)
    low, high = intervals["NAT"]
    assert abs((high - low) / 2 - half) < 1.0 and abs((high + low) / 2 - 50) < 1.0
    avg = point["Avg"] / 100
    assert abs((intervals["Avg"][1] - intervals["Avg"][0]) / 2 - 100 * 1.96 * math.sqrt(avg * (1 - avg) / 361)) < 1.0


def test_bootstrap_difference_is_paired(sqa_dir):  # noqa: F811
    problems = [dataclasses.replace(p, pid=f"{p.pid}-{i}") for i in range(60) for p in text_only(sqa_dir)]
    by_pid = {p.pid: p for p in problems}
    rng = np.random.default_rng(7)
    first = records_with(problems, rng.random(len(problems)) < 0.5)
    assert scienceqa.bootstrap_difference(first, first, by_pid) == (0.0, 0.0)  # the same answers: no difference
    # Ten answers turned from wrong to right: +10/360 of the problems, whichever are drawn; never below zero.
    wrong = [i for i, record in enumerate(first) if not record["correct"]][:10]
    better = [records_with([problems[i]], [True])[0] if i in wrong else record for i, record in enumerate(first)]
    low, high = scienceqa.bootstrap_difference(better, first, by_pid, seed=3)
    assert 0 <= low < 100 * 10 / 360 < high
    assert (low, high) == scienceqa.bootstrap_difference(better, first, by_pid, seed=3)
    # Unpaired, the two models' own intervals overlap almost entirely.
    ours, theirs = (scienceqa.bootstrap_intervals(r, by_pid)["Avg"] for r in (better, first))
    assert ours[0] < theirs[1]
    with pytest.raises(ValueError, match="answer different problems"):
        scienceqa.bootstrap_difference(first[1:], first, by_pid)


def test_bootstrap_refuses_what_score_refuses(sqa_dir):  # noqa: F811
    problems = text_only(sqa_dir)
    records = records_with(problems, [True] * len(problems))
    records[0]["correct"] = False
    with pytest.raises(ValueError, match="correct=False but pred"):
        scienceqa.bootstrap_intervals(records, {p.pid: p for p in problems})
    with pytest.raises(ValueError, match="nothing to score"):
        scienceqa.bootstrap_intervals([], {p.pid: p for p in problems})


def test_extra_train_joins_the_scienceqa_rows_and_the_run_records_it(tmp_path, sqa_dir, make_base, tokenizer, capsys):  # noqa: F811
    base_dir = tmp_path / "base"
    make_base().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    extra = write_rows(tmp_path, [ARC_ROW] * 3)
    out = tmp_path / "run"
    flags = ["--max-steps", "1", "--batch-size", "4", "--val-fraction", "0", "--adapter-layers", "2"]
    cli.main(["train", "--task", "scienceqa", "--data", str(sqa_dir), "--base", str(base_dir), "--out", str(out),
              "--extra-train", str(extra), *flags])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1
    assert json.loads((out / "train_config.json").read_text())["extra_train"] == [str(extra)]
    # 1 ScienceQA train problem + 3 ARC rows: one step of 4 rows saw them all.
    assert summary["train_tokens"] > 3 * len(tokenizer("Which gas do plants take in?")["input_ids"])


def test_a_checkpoint_saved_with_cot_reads_as_explanation():
    assert settings_of_today({"cot": True, "lr": 0.1})["explanation"] == "after"
    assert settings_of_today({"cot": False})["explanation"] == "none"
    assert "cot" not in settings_of_today({"cot": False})
    assert settings_of_today({})["extra_train"] == [] and settings_of_today({})["answer_form"] == "letter"


def test_eval_scores_an_adapter_as_its_targets_begin(tmp_path, sqa_dir, make_base, tokenizer, capsys):  # noqa: F811
    base_dir = tmp_path / "base"
    make_base().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    flags = ["--max-steps", "1", "--batch-size", "1", "--val-fraction", "0", "--adapter-layers", "2"]
    for explanation in ("after", "before"):
        cli.main(["train", "--task", "scienceqa", "--data", str(sqa_dir), "--base", str(base_dir),
                  "--out", str(tmp_path / explanation), "--explanation", explanation, "--answer-form", "text",
                  *flags])  # fmt: skip
    evaluate = ["eval", "scienceqa", "--data", str(sqa_dir), "--scoring", "likelihood", "--missing-images", "text-only"]
    out = tmp_path / "after.jsonl"
    cli.main([*evaluate, "--adapter", str(tmp_path / "after"), "--out", str(out)])
    settings = json.loads(out.with_suffix(".settings.json").read_text())
    assert (settings["explanation"], settings["answer_form"]) == ("after", "text")
    problems = {p.pid: p for p in text_only(sqa_dir)}
    for pid, record in read_predictions(out).items():  # each output names an option by its text, and is read so
        assert record["output"] == f"The answer is {problems[pid].choices[record['pred']]}.\nBECAUSE:"
    with pytest.raises(SystemExit, match="score it with generation"):
        cli.main([*evaluate, "--adapter", str(tmp_path / "before"), "--out", str(tmp_path / "before.jsonl")])
    assert not (tmp_path / "before.jsonl").exists()
