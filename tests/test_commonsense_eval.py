"""LLM-Adapters' commonsense evaluation: label extraction, gold answers, scores, resumable predictions, the CLI."""

import json
import re
from collections import Counter

import pytest
from test_math_eval import row, serve_canned_answers, write_sets

from llama_adapter import cli
from llama_adapter.data import sources
from llama_adapter.evaluation.llm_adapters import (
    COMMONSENSE_DATASETS,
    COMMONSENSE_LABELS,
    MATH_DATASETS,
    PREDICTION_FIELDS,
    Question,
    format_table,
    load_questions,
    parse_label,
    prediction_record,
    read_answer,
    score,
)
from llama_adapter.evaluation.predict import BENCHMARK_DEFAULTS, DatasetsConfig, EvalConfig, evaluate_questions
from llama_adapter.evaluation.predictions import read_predictions


def question(dataset, answer, pid=None):
    return Question(pid or f"{dataset}/0", dataset, "Which one?", "", answer)


@pytest.mark.parametrize(
    "dataset, text, expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false, because it is not true", "false"),  # both labels: the first
        ("boolq", "that is untrue", "true"),  # no word boundaries, as in LLM-Adapters
        ("boolq", "True", None),  # case-sensitive, as in LLM-Adapters
        ("boolq", "", None),
        ("piqa", "the correct answer is solution2", "solution2"),
        ("piqa", "Solution1: use a knife. the correct answer is solution2", "solution2"),  # an echoed option list
        ("piqa", "solution3 or SOLUTION1", None),
        ("social_i_qa", "the correct answer is answer3\n\nAnswer format: answer1/answer2/answer3", "answer3"),
        ("social_i_qa", "Answer2", None),
        ("winogrande", "the correct answer is option2, not option1", "option2"),
        ("winogrande", "Option1: Sarah", None),
        ("ARC-Easy", "the correct answer is answer5", "answer5"),
        ("ARC-Easy", "answer: answer2", "answer2"),  # any statement: the label is found wherever it stands
        ("ARC-Challenge", "answer4answer1", "answer4"),
        ("openbookqa", "I am not sure.", None),
        ("hellaswag", "the correct answer is ending4", "ending4"),
    ],
)
def test_parse_label_takes_the_first_label_of_the_dataset(dataset, text, expected):
    assert parse_label(text, dataset) == expected


def test_each_dataset_reads_its_own_kind_of_answer():
    assert read_answer("boolq", "answer2 12 B true") == "true"
    assert read_answer("piqa", "answer2 12 B true") is None
    assert read_answer("openbookqa", "answer2 12 B true") == "answer2"
    assert read_answer("AQuA", "answer2 12 B true") == "B"
    assert read_answer("gsm8k", "answer2 12 B true") == 12.0
    assert set(COMMONSENSE_DATASETS) < set(COMMONSENSE_LABELS) and "hellaswag" not in COMMONSENSE_DATASETS
    table_order = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
    assert COMMONSENSE_DATASETS == table_order  # LLM-Adapters' table, less HellaSwag


def test_label_answers_are_right_wrong_or_unparsed():
    right = prediction_record(question("social_i_qa", "answer3"), "the correct answer is answer3")
    assert (right["pred"], right["correct"]) == ("answer3", True)
    assert tuple(right) == PREDICTION_FIELDS and right["answer"] == "answer3"
    wrong = prediction_record(question("boolq", "false"), "true. It is false.")
    assert (wrong["pred"], wrong["correct"]) == ("true", False)
    unparsed = prediction_record(question("winogrande", "option1"), "Sarah")
    assert (unparsed["pred"], unparsed["correct"]) == (None, False)


def test_a_gold_number_is_read_as_the_answers_are():
    assert prediction_record(question("gsm8k", "1,234"), "The answer is 1234.")["correct"]
    assert prediction_record(question("gsm8k", "12 apples"), "12")["correct"]


def test_score_and_table_cover_the_commonsense_sets():
    outputs = {"boolq": ["true", "false", "yes"], "piqa": ["solution1"], "openbookqa": ["answer1"]}
    records = [
        prediction_record(question(name, COMMONSENSE_LABELS[name][0], f"{name}/{i}"), out)
        for name, outs in outputs.items()
        for i, out in enumerate(outs)
    ]
    scores = score(records, ("boolq", "piqa", "winogrande"))
    assert scores["accuracy"] == pytest.approx({"boolq": 100 / 3, "piqa": 100.0, "Avg": (100 / 3 + 100) / 2})
    assert scores["count"] == {"boolq": 3, "piqa": 1, "winogrande": 0}
    assert scores["unparsed"] == {"boolq": 1, "piqa": 0, "winogrande": 0}
    assert format_table(scores).splitlines()[::2] == ["| boolq | piqa | Avg |", "| 33.3 | 100.0 | 66.7 |"]


def test_commonsense_config_defaults_to_all_sets_and_32_tokens():
    defaults = BENCHMARK_DEFAULTS["commonsense"]
    assert (defaults["datasets"], defaults["max_new_tokens"], defaults["batch_size"]) == (COMMONSENSE_DATASETS, 32, 16)
    assert BENCHMARK_DEFAULTS["math"]["max_new_tokens"] == 256
    assert DatasetsConfig(datasets=["piqa"]).datasets == ("piqa",)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        EvalConfig(data="d", out="o.jsonl", max_new_tokens=0)
    with pytest.raises(ValueError, match="names a test set twice"):
        DatasetsConfig(datasets=["boolq", "boolq"])


@pytest.mark.parametrize(
    "benchmark, datasets, max_new_tokens",
    [("commonsense", COMMONSENSE_DATASETS, 32), ("math", MATH_DATASETS, 256)],
)
def test_cli_flags_default_per_benchmark(benchmark, datasets, max_new_tokens):
    args = cli.build_parser().parse_args(["eval", benchmark, "--data", "d", "--out", "o.jsonl", "--base", "b"])
    assert (args.datasets, args.max_new_tokens, args.batch_size) == (datasets, max_new_tokens, 16)


def test_one_loader_reads_both_benchmarks_in_the_order_asked(tmp_path):
    root = write_sets(
        tmp_path,
        boolq=[row("Is it? Answer format: true/false", " true "), row("Is it not?", "false")],
        gsm8k=[row("Add 1 and 2.", "3")],
        winogrande=[row("Sarah or Maria?", "option2", input=None), row("Tom or Ann?", "option1")],
    )
    questions = load_questions(root, ("winogrande", "gsm8k", "boolq"))
    assert [q.pid for q in questions] == ["winogrande/0", "winogrande/1", "gsm8k/0", "boolq/0", "boolq/1"]
    assert questions[0] == Question("winogrande/0", "winogrande", "Sarah or Maria?", "", "option2")
    assert questions[3].answer == "true"
    assert [q.pid for q in load_questions(root, ("boolq", "winogrande"), limit=1)] == ["boolq/0", "winogrande/0"]


@pytest.mark.parametrize(
    "dataset, answers, problem",
    [
        ("boolq", ["true", "True"], "row 1: field 'answer' is 'True', expected one of true, false"),
        ("piqa", ["solution3"], "row 0: field 'answer' is 'solution3', expected one of solution1, solution2"),
        ("social_i_qa", ["answer 3"], "row 0: field 'answer' is 'answer 3', expected one of answer1, answer2, "),
        ("winogrande", ["option1", "option2", "Maria"], "row 2: field 'answer' is 'Maria', expected one of option1"),
        ("ARC-Easy", ["A"], "row 0: field 'answer' is 'A', expected one of answer1, answer2, answer3, answer4, ans"),
        ("ARC-Challenge", ["answer6"], "row 0: field 'answer' is 'answer6', expected one of answer1"),
        ("openbookqa", ["the correct answer is answer2"], "row 0: field 'answer' is 'the correct answer is answer2'"),
        ("hellaswag", ["ending5"], "row 0: field 'answer' is 'ending5', expected one of ending1, ending2, ending3"),
    ],
)
def test_a_gold_answer_that_is_not_a_label_names_the_file_and_row(tmp_path, dataset, answers, problem):
    write_sets(tmp_path, **{dataset: [row("Which one?", answer) for answer in answers]})
    with pytest.raises(sources.DataError, match=re.escape(f"{tmp_path / dataset / 'test.json'}: {problem}")):
        load_questions(tmp_path, (dataset,))


CANNED = {  # test set -> (instruction, gold answer, the model's answer) of each question
    "boolq": [("Is the sky blue?", "true", "the correct answer is true"), ("Is ice hot?", "false", "false, not true")],
    "piqa": [("Open a jar.", "solution2", "the correct answer is solution2"), ("Dry a shirt.", "solution1", "Hang it")],
    "winogrande": [("Sarah or Maria?", "option1", "option1 or option2"), ("Tom or Ann?", "option2", "Option2")],
}


@pytest.fixture
def canned(tmp_path, monkeypatch):
    """Three small commonsense test sets answered from CANNED."""
    return serve_canned_answers(tmp_path / "sets", CANNED, monkeypatch, max_new_tokens=32)


def test_commonsense_evaluation_scores_the_canned_answers(make_model, canned, tmp_path):
    questions, asked = canned
    out = tmp_path / "preds" / "commonsense.jsonl"
    scores = evaluate_questions(make_model(), questions, out, tuple(CANNED), batch_size=4, max_new_tokens=32)
    assert [len(batch) for batch in asked] == [4, 2]
    assert scores["accuracy"] == pytest.approx({"boolq": 100.0, "piqa": 50.0, "winogrande": 50.0, "Avg": 200 / 3})
    assert scores["unparsed"] == {"boolq": 0, "piqa": 1, "winogrande": 1}
    records = read_predictions(out, PREDICTION_FIELDS)
    assert list(records) == [q.pid for q in questions]
    assert records["winogrande/0"] == {
        "pid": "winogrande/0", "dataset": "winogrande", "output": "option1 or option2", "pred": "option1",
        "answer": "option1", "correct": True,
    }  # fmt: skip


def test_commonsense_evaluation_generates_with_the_real_tiny_model(make_model, tmp_path):
    questions = load_questions(
        write_sets(tmp_path, boolq=[row("Is it?", "true"), row("Is it not?", "false")]), ("boolq",)
    )
    out = tmp_path / "commonsense.jsonl"
    scores = evaluate_questions(make_model(), questions, out, ("boolq",), batch_size=2, max_new_tokens=5)
    assert scores["count"] == {"boolq": 2}
    records = read_predictions(out, PREDICTION_FIELDS)
    assert all(
        isinstance(r["output"], str) and r["pred"] == parse_label(r["output"], "boolq") for r in records.values()
    )


def test_cli_eval_commonsense_prints_and_saves_the_table(tmp_path, tiny_base_dir, capsys):
    sets = {
        "boolq": [row(f"Is {i} even? Answer format: true/false", ["true", "false"][i % 2]) for i in range(3)],
        "piqa": [row(f"Fix {i}. Answer format: solution1/solution2", "solution1") for i in range(3)],
        "openbookqa": [row("Pick.", "answer4")],
    }
    root = write_sets(tmp_path / "sets", **sets)
    out = tmp_path / "eval" / "commonsense.jsonl"
    argv = ["eval", "commonsense", "--data", str(root), "--out", str(out), "--base", str(tiny_base_dir)]
    flags = ["--datasets", "piqa", "boolq", "--limit", "2", "--precision", "fp32"]
    cli.main([*argv, *flags])
    printed = capsys.readouterr().out
    assert "Commonsense accuracy (%), 4 questions, unparsed: " in printed
    assert "| piqa | boolq | Avg |" in printed
    saved = json.loads(out.with_suffix(".scores.json").read_text())
    assert saved["count"] == {"piqa": 2, "boolq": 2}
    assert set(saved["accuracy"]) == {"piqa", "boolq", "Avg"}
    assert saved["settings"]["max_new_tokens"] == 32 and saved["settings"]["data"] == str(root)
    records = read_predictions(out, PREDICTION_FIELDS)
    assert list(records) == ["piqa/0", "piqa/1", "boolq/0", "boolq/1"]
    assert all(r["pred"] == parse_label(r["output"], r["dataset"]) for r in records.values())
    cli.main([*argv, *flags, "--max-new-tokens", "32"])  # everything is done: nothing is generated again
    assert out.read_text().count("\n") == 4
    with pytest.raises(SystemExit, match="llama-adapter eval: error: .*other settings"):
        cli.main([*argv, *flags, "--max-new-tokens", "5"])


def test_cli_eval_commonsense_names_the_missing_hellaswag(tmp_path, tiny_base_dir):
    root = write_sets(tmp_path / "sets", boolq=[row("Is it?", "true")], piqa=[row("Fix it.", "solution1")])
    argv = [
        "eval",
        "commonsense",
        "--data",
        str(root),
        "--out",
        str(tmp_path / "c.jsonl"),
        "--base",
        str(tiny_base_dir),
    ]
    missing = re.escape(f"{root / 'hellaswag' / 'test.json'}: no such file (test sets in {root}: boolq, piqa)")
    with pytest.raises(SystemExit, match=f"^llama-adapter eval: error: {missing}"):
        cli.main([*argv, "--datasets", "boolq", "hellaswag"])
    assert not (tmp_path / "c.jsonl").exists()


@pytest.fixture
def llm_adapters_dir(data_dir):
    path = data_dir / "llm-adapters"
    if not path.is_dir():
        pytest.skip(f"{path} not found (LLM-Adapters' test sets; set LLAMA_ADAPTER_DATA to the folder holding it)")
    return path


def test_real_commonsense_test_sets_load_whole(llm_adapters_dir):
    questions = load_questions(llm_adapters_dir, COMMONSENSE_DATASETS)
    counts = {
        "boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267, "ARC-Easy": 2376, "ARC-Challenge": 1172,
        "openbookqa": 500,
    }  # fmt: skip
    assert Counter(q.dataset for q in questions) == counts
    assert list(dict.fromkeys(q.dataset for q in questions)) == list(COMMONSENSE_DATASETS)
    assert len({q.pid for q in questions}) == len(questions)
    assert {q.answer for q in questions if q.dataset == "boolq"} == {"true", "false"}
    assert {q.answer for q in questions if q.dataset == "ARC-Easy"} == {f"answer{i}" for i in range(1, 6)}


def test_real_gold_outputs_read_as_their_answer_even_with_the_question_echoed_after(llm_adapters_dir):
    """The rows' own outputs ("the correct answer is answer3") are right; a model that runs on into the question
    (option list, "Answer format: answer1/answer2/...") after its label still reads as that label."""
    for name in COMMONSENSE_DATASETS:
        rows = json.loads((llm_adapters_dir / name / "test.json").read_text())
        questions = load_questions(llm_adapters_dir, (name,))
        for q, r in zip(questions, rows):
            assert prediction_record(q, r["output"])["correct"], (q.pid, r["output"])
            assert prediction_record(q, f"{r['output']}\n\n{q.instruction}")["correct"], q.pid
