"""LLM-Adapters' math evaluation: answer extraction, scores, test sets, resumable predictions, the CLI."""

import json
import re
from collections import Counter

import pytest

from llama_adapter import cli
from llama_adapter.data import sources, templates
from llama_adapter.evaluation.llm_adapters import (
    LETTER_DATASETS,
    MATH_DATASETS,
    PREDICTION_FIELDS,
    Question,
    format_table,
    load_questions,
    parse_letter,
    parse_number,
    prediction_record,
    score,
)
from llama_adapter.evaluation.predict import BENCHMARK_DEFAULTS, DatasetsConfig, EvalConfig, evaluate_questions
from llama_adapter.evaluation.predictions import read_predictions


def write_sets(root, **sets):
    """Each keyword a test set: <root>/<name>/test.json holding its rows, or its raw text when given a string."""
    for name, rows in sets.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        text = rows if isinstance(rows, str) else json.dumps(rows)
        (root / name / "test.json").write_text(text)
    return root


def row(instruction, answer, input="", output=""):
    return {"instruction": instruction, "input": input, "output": output, "answer": answer}


def question(dataset, answer, pid=None):
    return Question(pid or f"{dataset}/0", dataset, "How many?", "", answer)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 apples and 4 pears make 7. The answer is 7.", 7.0),
        ("He pays $1,234 in total.", 1234.0),
        ("It went from 10,000 to 2,500,000.5 dollars", 2500000.5),
        ("The temperature is -3.", -3.0),
        ("She ran 2.75 miles.", 2.75),
        ("no number here", None),
        ("", None),
    ],
)
def test_parse_number_takes_the_last_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is C.", "C"),
        ("Answer: (B) ... so D", "D"),
        ("Answer: (B)", "B"),
        ("The correct answer is (B).", "B"),  # the statement's forms need no rule: the letter stands alone
        ("All Elephants Eat Bananas", None),
        ("no option at all", None),
        ("Options F and G", None),
    ],
)
def test_parse_letter_takes_the_last_standalone_option(text, expected):
    assert parse_letter(text) == expected


def test_numeric_answers_match_within_a_thousandth():
    right = prediction_record(question("gsm8k", "15.0"), "5 + 10 is 15.")
    assert (right["pred"], right["correct"]) == (15.0, True)
    assert prediction_record(question("SVAMP", "0.3333"), "x = 0.333")["correct"]
    assert not prediction_record(question("SVAMP", "0.3333"), "x = 0.33")["correct"]
    wrong = prediction_record(question("gsm8k", "15.0"), "The answer is 14.")
    assert (wrong["pred"], wrong["correct"]) == (14.0, False)
    unparsed = prediction_record(question("gsm8k", "15.0"), "I cannot tell.")
    assert (unparsed["pred"], unparsed["correct"]) == (None, False)
    assert tuple(right) == PREDICTION_FIELDS
    assert right["pid"] == "gsm8k/0" and right["answer"] == "15.0" and right["output"] == "5 + 10 is 15."


def test_aqua_answers_compare_letters_not_numbers():
    assert LETTER_DATASETS == {"AQuA"}
    right = prediction_record(question("AQuA", "C"), "It costs 12 dollars. The answer is (C).")
    assert (right["pred"], right["correct"]) == ("C", True)
    wrong = prediction_record(question("AQuA", "C"), "The answer is A")
    assert (wrong["pred"], wrong["correct"]) == ("A", False)
    assert prediction_record(question("AQuA", "C"), "It costs 12 dollars.")["pred"] is None


def test_score_averages_the_datasets_not_the_questions():
    records = [prediction_record(question("gsm8k", "2", f"gsm8k/{i}"), out) for i, out in enumerate(["2", "3", "?"])]
    records += [prediction_record(question("AQuA", "B"), "B")]
    records += [prediction_record(question("SVAMP", "1"), "1")]  # a test set not asked for
    scores = score(records, ("gsm8k", "AQuA", "AddSub"))
    assert scores["accuracy"] == pytest.approx({"gsm8k": 100 / 3, "AQuA": 100.0, "Avg": (100 / 3 + 100) / 2})
    assert scores["count"] == {"gsm8k": 3, "AQuA": 1, "AddSub": 0}
    assert scores["unparsed"] == {"gsm8k": 1, "AQuA": 0, "AddSub": 0}
    with pytest.raises(ValueError, match="nothing to score: no prediction of any question of gsm8k"):
        score([], ("gsm8k",))  # an average of nothing is no score, not a 0


def test_table_has_a_column_per_dataset_then_the_average():
    table = format_table({"accuracy": {"gsm8k": 100 / 3, "AQuA": 50.0, "Avg": 41.6667}})
    assert table.splitlines() == ["| gsm8k | AQuA | Avg |", "|---|---|---|", "| 33.3 | 50.0 | 41.7 |"]


def test_config_checks_its_limits_and_keeps_datasets_a_tuple():
    assert DatasetsConfig().datasets == BENCHMARK_DEFAULTS["math"]["datasets"] == MATH_DATASETS
    assert DatasetsConfig(datasets=["AQuA"]).datasets == ("AQuA",)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        EvalConfig(data="d", out="o.jsonl", batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        EvalConfig(data="d", out="o.jsonl", max_new_tokens=0)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        EvalConfig(data="d", out="o.jsonl", limit=0)
    with pytest.raises(ValueError, match="at least one test set"):
        DatasetsConfig(datasets=())


def test_questions_come_in_the_order_asked_with_pids_and_a_limit_per_set(tmp_path):
    root = write_sets(
        tmp_path,
        gsm8k=[row(" Add 1 and 2. ", "3", output="1 + 2 = 3."), row("Add 2 and 2.", " 4 "), row("Add 3.", "3")],
        AQuA=[row("Pick one.", "B", input="Answer Choices: (A)1 (B)2"), row("Pick again.", "E", input=None)],
    )
    questions = load_questions(root, ("AQuA", "gsm8k"))
    assert [q.pid for q in questions] == ["AQuA/0", "AQuA/1", "gsm8k/0", "gsm8k/1", "gsm8k/2"]
    assert questions[0] == Question("AQuA/0", "AQuA", "Pick one.", "Answer Choices: (A)1 (B)2", "B")
    assert questions[1].input == ""
    assert (questions[2].instruction, questions[3].answer) == ("Add 1 and 2.", "4")
    limited = load_questions(str(root), ("gsm8k", "AQuA"), limit=2)
    assert [q.pid for q in limited] == ["gsm8k/0", "gsm8k/1", "AQuA/0", "AQuA/1"]


def test_a_missing_test_set_names_its_file_and_the_sets_present(tmp_path):
    root = write_sets(tmp_path, gsm8k=[row("Add.", "3")], SVAMP=[row("Add.", "3")])
    (tmp_path / "notes").mkdir()
    expected = f"{tmp_path / 'AddSub' / 'test.json'}: no such file (test sets in {tmp_path}: SVAMP, gsm8k)"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        load_questions(root, ("gsm8k", "AddSub"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"test sets in {tmp_path / 'empty'}: none")):
        load_questions(tmp_path / "empty", ("gsm8k",))


@pytest.mark.parametrize(
    "dataset, content, problem",
    [
        ("gsm8k", "[{", "invalid JSON at line 1"),
        ("gsm8k", json.dumps({"rows": []}), "expected a list of rows, got dict"),
        ("gsm8k", json.dumps([row("Add.", "3"), ["Add.", "3"]]), "row 1: expected an object, got list"),
        ("gsm8k", json.dumps([{"answer": "3"}]), "row 0: field 'instruction' is missing, empty or not a string"),
        ("SVAMP", json.dumps([row("Add.", "3"), row("  ", "3")]), "row 1: field 'instruction' is missing, empty"),
        ("SVAMP", json.dumps([row("Add.", 3)]), "row 0: field 'answer' is missing, empty or not a string"),
        ("AddSub", json.dumps([row("Add.", "twelve")]), "row 0: field 'answer' is 'twelve', expected a number"),
        (
            "AQuA",
            json.dumps([row("Pick.", "A"), row("Pick.", "F")]),
            "row 1: field 'answer' is 'F', expected an option",
        ),
        ("AQuA", json.dumps([row("Pick.", "12")]), "row 0: field 'answer' is '12', expected an option letter A-E"),
    ],
)
def test_bad_test_sets_name_the_file_and_row(tmp_path, dataset, content, problem):
    write_sets(tmp_path, **{dataset: content})
    with pytest.raises(sources.DataError, match=re.escape(f"{tmp_path / dataset / 'test.json'}: {problem}")):
        load_questions(tmp_path, (dataset,))


CANNED = {  # test set -> (instruction, gold answer, the model's answer) of each question
    "gsm8k": [("Add 7 and 8.", "15.0", "7 + 8 = 15. The answer is 15."), ("Sum.", "1234", "The answer is 1,234.")],
    "SVAMP": [("Halve -5.", "-2.5", "The answer is -2.5"), ("Guess.", "4", "I do not know.")],
    "AQuA": [("Pick the price.", "C", "It costs 3. The answer is (C)."), ("Pick again.", "A", "The answer is B.")],
}


def serve_canned_answers(root, canned: dict, monkeypatch, max_new_tokens: int):
    """Test sets written from `canned` ({set: [(instruction, gold, answer)]}) and their questions, and a
    generate_batch that answers from it, checks the answer length limit and records every batch of prompts."""
    sets = {name: [row(q, gold) for q, gold, _ in items] for name, items in canned.items()}
    questions = load_questions(write_sets(root, **sets), tuple(canned))
    answers = {templates.format_prompt(q): out for items in canned.values() for q, _, out in items}
    asked = []

    def fake(model, prompts, sampling, on_row_done=None):
        assert sampling.max_new_tokens == max_new_tokens
        asked.append(prompts)
        return [answers[prompt] for prompt in prompts]

    monkeypatch.setattr("llama_adapter.evaluation.predict.generate_batch", fake)
    return questions, asked


@pytest.fixture
def canned(tmp_path, monkeypatch):
    """Three small math test sets answered from CANNED."""
    return serve_canned_answers(tmp_path / "sets", CANNED, monkeypatch, max_new_tokens=7)


def test_math_evaluation_scores_the_canned_answers(make_model, canned, tmp_path):
    questions, asked = canned
    out = tmp_path / "preds" / "math.jsonl"
    scores = evaluate_questions(make_model(), questions, out, tuple(CANNED), batch_size=4, max_new_tokens=7)
    assert [len(batch) for batch in asked] == [4, 2]
    assert scores["accuracy"] == pytest.approx({"gsm8k": 100.0, "SVAMP": 50.0, "AQuA": 50.0, "Avg": 200 / 3})
    assert scores["count"] == {"gsm8k": 2, "SVAMP": 2, "AQuA": 2}
    assert scores["unparsed"] == {"gsm8k": 0, "SVAMP": 1, "AQuA": 0}
    records = read_predictions(out, PREDICTION_FIELDS)
    assert list(records) == [q.pid for q in questions]
    assert records["gsm8k/1"] | {"output": None} == {
        "pid": "gsm8k/1", "dataset": "gsm8k", "output": None, "pred": 1234.0, "answer": "1234", "correct": True
    }  # fmt: skip


def test_math_evaluation_resumes_and_redoes_a_torn_last_line(make_model, canned, tmp_path):
    questions, asked = canned
    out = tmp_path / "math.jsonl"
    model = make_model()
    first = evaluate_questions(model, questions[:4], out, tuple(CANNED), max_new_tokens=7)
    assert first["count"] == {"gsm8k": 2, "SVAMP": 2, "AQuA": 0}
    assert "AQuA" not in first["accuracy"]
    full = evaluate_questions(model, questions, out, tuple(CANNED), max_new_tokens=7)
    assert asked[1] == [templates.format_prompt(q.instruction) for q in questions[4:]]
    assert evaluate_questions(model, questions, out, tuple(CANNED), max_new_tokens=7) == full
    assert len(asked) == 2
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:20])
    assert evaluate_questions(model, questions, out, tuple(CANNED), max_new_tokens=7) == full
    assert asked[2] == [templates.format_prompt(questions[-1].instruction)]
    assert out.read_text().count("\n") == len(out.read_text().splitlines()) == len(questions)
    assert evaluate_questions(model, questions[:2], out, ("gsm8k",), max_new_tokens=7)["count"] == {"gsm8k": 2}


def test_math_evaluation_generates_with_the_real_tiny_model(make_model, tmp_path):
    questions = load_questions(write_sets(tmp_path, AddSub=[row("Add 1 and 2.", "3"), row("Add 2.", "2")]), ("AddSub",))
    out = tmp_path / "math.jsonl"
    scores = evaluate_questions(make_model(), questions, out, ("AddSub",), batch_size=2, max_new_tokens=5)
    assert scores["count"] == {"AddSub": 2}
    records = read_predictions(out, PREDICTION_FIELDS)
    assert all(isinstance(r["output"], str) and r["pred"] == parse_number(r["output"]) for r in records.values())


def test_cli_eval_math_prints_and_saves_the_table(tmp_path, tiny_base_dir, capsys):
    items = [row(f"Add {i} and {i}.", str(2 * i)) for i in range(3)]
    letters = [row(f"Pick {c}.", c, input="Answer Choices: (A)1 (B)2 (C)3") for c in "ABC"]
    root = write_sets(tmp_path / "sets", gsm8k=items, AQuA=letters, SVAMP=items)
    out = tmp_path / "eval" / "math.jsonl"
    argv = ["eval", "math", "--data", str(root), "--out", str(out), "--base", str(tiny_base_dir)]
    flags = ["--datasets", "gsm8k", "AQuA", "--limit", "2", "--precision", "fp32"]
    cli.main([*argv, *flags, "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert "Math accuracy (%), 4 questions" in printed
    assert "| gsm8k | AQuA | Avg |" in printed
    saved = json.loads(out.with_suffix(".scores.json").read_text())
    assert saved["count"] == {"gsm8k": 2, "AQuA": 2}
    assert set(saved["accuracy"]) == {"gsm8k", "AQuA", "Avg"}
    assert saved["settings"]["max_new_tokens"] == 4 and saved["settings"]["data"] == str(root)
    assert json.loads(out.with_suffix(".settings.json").read_text())["precision"] == "fp32"
    assert Counter(r["dataset"] for r in read_predictions(out, PREDICTION_FIELDS).values()) == {
        "gsm8k": 2, "AQuA": 2
    }  # fmt: skip
    with pytest.raises(SystemExit, match="llama-adapter eval: error: .*other settings"):
        cli.main([*argv, *flags, "--max-new-tokens", "5"])


def test_cli_eval_math_names_a_missing_test_set(tmp_path, tiny_base_dir):
    root = write_sets(tmp_path / "sets", gsm8k=[row("Add.", "3")])
    argv = ["eval", "math", "--data", str(root), "--out", str(tmp_path / "m.jsonl"), "--base", str(tiny_base_dir)]
    missing = re.escape(f"{root / 'gsm8k8k' / 'test.json'}: no such file (test sets in {root}: gsm8k)")
    with pytest.raises(SystemExit, match=f"^llama-adapter eval: error: {missing}"):
        cli.main([*argv, "--datasets", "gsm8k8k"])
    assert not (tmp_path / "m.jsonl").exists()


def test_real_math_test_sets_load_whole(data_dir):
    questions = load_questions(data_dir / "llm-adapters", MATH_DATASETS)
    counts = {"gsm8k": 1319, "SVAMP": 1000, "MultiArith": 600, "AddSub": 395, "AQuA": 254, "SingleEq": 508}
    assert Counter(q.dataset for q in questions) == counts
    assert len({q.pid for q in questions}) == len(questions)
    assert [q.pid for q in questions[:2]] == ["gsm8k/0", "gsm8k/1"]


def test_real_training_answers_read_back_as_their_answer_sentence(data_dir):
    rows = json.loads((data_dir / "llm-adapters" / "math_data.json").read_text())
    assert len(rows) == 3260
    lettered = [r["answer"] in ("A", "B", "C", "D", "E") for r in rows]
    said = [(r, letter) for r, letter in zip(rows, lettered) if "The answer is" in r["output"]]
    agree = 0
    for r, letter in said:
        parse = parse_letter if letter else parse_number
        sentence = parse(r["output"].rsplit("The answer is", 1)[1])
        agree += sentence is not None and parse(r["output"]) == sentence
    assert agree / len(said) >= 0.999, f"{agree}/{len(said)} = {agree / len(said):.4f} read as their answer sentence"
    # The rationales are model-written and reach the gold answer about three times in four: a floor for the parser.
    questions = [question("AQuA" if letter else "gsm8k", r["answer"]) for r, letter in zip(rows, lettered)]
    correct = sum(prediction_record(q, r["output"])["correct"] for q, r in zip(questions, rows))
    assert correct / len(rows) >= 0.76, f"{correct}/{len(rows)} = {correct / len(rows):.4f} match the gold answer"
