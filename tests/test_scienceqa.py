"""ScienceQA: loading with clear errors, prompts, answer parsing, the score table, the resumable predictions file."""

import json
import random

import pytest
from PIL import Image

from llama_adapter.data.sources import DataError
from llama_adapter.data.templates import format_prompt
from llama_adapter.evaluation import scienceqa as sqa
from llama_adapter.evaluation.scienceqa import Problem


def problem_record(question, choices, answer, subject, grade, split="test", hint="", image=None, **extra):
    return {
        "question": question,
        "choices": choices,
        "answer": answer,
        "hint": hint,
        "image": image,
        "task": "closed choice",
        "subject": subject,
        "grade": grade,
        "split": split,
        "lecture": "",
        "solution": "",
    } | extra


# Test problems 1-6 cover every column: subject x context (text, image, both, none) x grade band.
PROBLEMS = {
    "1": problem_record(
        "Which state is farthest north?",
        ["Ohio", "Utah", "Texas"],
        0,
        "natural science",
        "grade3",
        image="image.png",
        lecture="Maps have a compass rose.",
        solution="Ohio is farthest north.",
    ),
    "2": problem_record("What is 2 + 2?", ["3", "4"], 1, "natural science", "grade8", hint="Count carefully."),
    "3": problem_record("Is ice cold?", ["yes", "no"], 0, "natural science", "grade2"),
    "4": problem_record(
        "Which country is shown?", ["Chile", "Peru"], 1, "social science", "grade10", hint="Look.", image="image.png"
    ),
    "5": problem_record("Which word is a noun?", ["run", "dog", "blue", "fast"], 1, "language science", "grade5"),
    "6": problem_record(
        "Which city is a capital?", ["Lima", "Cusco"], 0, "social science", "grade7", hint="Peru.", image="image.png"
    ),
    "7": problem_record("Which is a mammal?", ["cat", "trout"], 0, "natural science", "grade4", "train", image="x.png"),
}
SPLITS = {"train": ["7"], "val": ["8"], "test": ["3", "1", "2", "99", "4", "5", "6"]}
OCR_BOXES = "[([[0, 0], [9, 0], [9, 9], [0, 9]], 'Ohio', 0.9), ([[0, 20], [9, 20], [9, 29], [0, 29]], 'Utah ', 0.5)]"


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def write_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)


@pytest.fixture
def sqa_dir(tmp_path):
    """The official layout; problem 6's image file is missing, problem 8 is listed in val but absent."""
    root = tmp_path / "scienceqa"
    write_json(root / "problems.json", PROBLEMS)
    write_json(root / "pid_splits.json", SPLITS)
    write_json(
        root / "captions.json", {"model": "vit-gpt2", "captions": {"1": "A map.", "4": "A flag.", "6": "A city."}}
    )
    write_json(root / "ocrs.json", {"model": "easyocr", "texts": {"1": OCR_BOXES, "4": "[]", "6": "[]"}})
    for split, pid, name in [("test", "1", "image.png"), ("test", "4", "image.png"), ("train", "7", "x.png")]:
        write_png(root / "images" / split / pid / name)
    return root


def text_only(root, split="test", **kwargs) -> list[Problem]:
    return sqa.load_problems(root, split, missing_images="text-only", **kwargs)[0]


# ---------------------------------------------------------------------------------------------------------------
# Loading the official layout


def test_loads_split_in_split_order_skipping_absent_pids(sqa_dir):
    problems, missing = sqa.load_problems(sqa_dir, "test", missing_images="text-only")
    assert [p.pid for p in problems] == ["3", "1", "2", "4", "5", "6"]
    assert missing == 1
    first = problems[1]
    assert first == Problem(
        pid="1",
        question="Which state is farthest north?",
        choices=("Ohio", "Utah", "Texas"),
        answer=0,
        hint="",
        image=sqa_dir / "images" / "test" / "1" / "image.png",
        names_image=True,
        subject="natural science",
        grade="grade3",
        split="test",
        lecture="Maps have a compass rose.",
        solution="Ohio is farthest north.",
        caption="A map.",
        ocr="Ohio, Utah",
    )
    assert first.image.is_absolute() and first.image.is_file()
    no_image = problems[0]
    assert (no_image.image, no_image.names_image, no_image.caption, no_image.ocr) == (None, False, "", "")


def test_missing_image_is_an_error_naming_pid_path_and_the_way_out(sqa_dir):
    with pytest.raises(DataError) as err:
        sqa.load_problems(sqa_dir, "test")
    message = str(err.value)
    assert "problems.json: problem 6: image " in message
    assert str(sqa_dir / "images" / "test" / "6" / "image.png") in message
    assert "1 of 6 problems" in message
    assert "--missing-images text-only" in message


def test_text_only_keeps_problems_whose_image_is_missing(sqa_dir):
    six = text_only(sqa_dir)[-1]
    assert (six.pid, six.image, six.names_image, six.caption) == ("6", None, True, "A city.")


def test_images_are_found_under_the_problems_own_split(sqa_dir):
    (train,), missing = sqa.load_problems(sqa_dir, "train")
    assert missing == 0
    assert train.image == sqa_dir / "images" / "train" / "7" / "x.png"


def test_without_splits_file_the_split_field_selects(sqa_dir):
    (sqa_dir / "pid_splits.json").unlink()
    assert [p.pid for p in text_only(sqa_dir)] == ["1", "2", "3", "4", "5", "6"]  # problems-file order
    with pytest.raises(DataError, match=r"problems.json: no problem has split 'val'; available: test, train"):
        sqa.load_problems(sqa_dir, "val")


def test_other_splits_file_name(sqa_dir):
    (sqa_dir / "pid_splits.json").rename(sqa_dir / "pid_splits_mine.json")
    assert [p.pid for p in text_only(sqa_dir, splits_file="pid_splits_mine.json")][:2] == ["3", "1"]


def test_unknown_or_empty_split_is_an_error(sqa_dir):
    with pytest.raises(DataError, match=r"pid_splits.json: unknown split 'dev'; available: train, val, test"):
        sqa.load_problems(sqa_dir, "dev")
    with pytest.raises(DataError, match=r"problems.json: no problems of split 'val'"):
        sqa.load_problems(sqa_dir, "val")


def test_bad_arguments_and_splits_file(sqa_dir):
    with pytest.raises(ValueError, match="missing_images must be one of"):
        sqa.load_problems(sqa_dir, "test", missing_images="skip")
    write_json(sqa_dir / "pid_splits.json", {"test": "3 1 2"})
    with pytest.raises(DataError, match=r"pid_splits.json: expected an object mapping split name -> list of pids"):
        sqa.load_problems(sqa_dir, "test")


def test_captions_and_ocr_files_are_optional(sqa_dir):
    (sqa_dir / "captions.json").unlink()
    (sqa_dir / "ocrs.json").unlink()
    first = text_only(sqa_dir)[1]
    assert (first.caption, first.ocr) == ("", "")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("question", 3, "problem 2: field 'question' must be a string, got int"),
        ("question", " ", "problem 2: field 'question' is empty"),
        ("choices", [], "problem 2: field 'choices' must be a non-empty list of strings"),
        ("choices", ["a", 1], "problem 2: field 'choices' must be a non-empty list of strings"),
        ("answer", 2, "problem 2: field 'answer' must be an integer index into the 2 choices, got 2"),
        ("answer", -1, "problem 2: field 'answer' must be an integer index into the 2 choices, got -1"),
        ("answer", "1", "problem 2: field 'answer' must be an integer index into the 2 choices, got '1'"),
        ("answer", True, "problem 2: field 'answer' must be an integer index"),
        ("hint", ["x"], "problem 2: field 'hint' must be a string, got list"),
        ("image", "", "problem 2: field 'image' must be a file name or null"),
        ("subject", "math", "problem 2: field 'subject' must be one of natural science, social science"),
        ("grade", "grade13", "problem 2: field 'grade' must be 'grade1' .. 'grade12', got 'grade13'"),
        ("grade", None, "problem 2: field 'grade' must be 'grade1' .. 'grade12', got None"),
        ("lecture", 5, "problem 2: field 'lecture' must be a string, got int"),
        ("split", None, "problem 2: field 'split' is null"),  # present but null: not "missing"
        ("split", ..., "problem 2: missing field 'split'"),
    ],
)
def test_bad_record_names_file_pid_and_field(sqa_dir, field, value, message):
    record = PROBLEMS["2"] | {field: value}
    if value is ...:
        del record[field]
    write_json(sqa_dir / "problems.json", PROBLEMS | {"2": record})
    with pytest.raises(DataError) as err:
        text_only(sqa_dir)
    assert str(err.value).startswith(f"{sqa_dir / 'problems.json'}: {message}")


def test_missing_or_broken_files_are_named(sqa_dir):
    with pytest.raises(DataError, match=r"other.json: no such file"):
        sqa.load_problems(sqa_dir, "test", problems_file="other.json")
    (sqa_dir / "problems.json").write_text('{"1": {"question": ')
    with pytest.raises(DataError, match=r"problems.json: invalid JSON at line 1"):
        text_only(sqa_dir)
    write_json(sqa_dir / "problems.json", list(PROBLEMS.values()))
    with pytest.raises(DataError, match=r"problems.json: expected an object mapping pid -> problem, got list"):
        text_only(sqa_dir)
    write_json(sqa_dir / "problems.json", PROBLEMS)
    write_json(sqa_dir / "captions.json", {"1": "A map."})
    with pytest.raises(DataError, match=r"captions.json: expected an object with a 'captions' object"):
        text_only(sqa_dir)


@pytest.mark.parametrize("entry", ["[(1, 2", "__import__('os').getcwd()", "[([0, 0], 3, 0.5)]", "{'a': 1}", "[1]", 7])
def test_unreadable_ocr_names_file_and_pid(sqa_dir, entry):
    write_json(sqa_dir / "ocrs.json", {"texts": {"1": OCR_BOXES, "4": entry}})
    with pytest.raises(DataError, match=r"ocrs.json: pid 4: OCR result is not a list of \(box, text, confidence\)"):
        text_only(sqa_dir)


def test_ocr_of_other_splits_is_not_parsed(sqa_dir):
    write_json(sqa_dir / "ocrs.json", {"texts": {"1": OCR_BOXES, "7": "not python"}})
    assert text_only(sqa_dir)[1].ocr == "Ohio, Utah"


# ---------------------------------------------------------------------------------------------------------------
# LLaVA's questions

LLAVA = [
    {
        "id": "10",
        "image": "10/image.png",
        "conversations": [
            {
                "from": "human",
                "value": "<image>\nContext: Read the map.\nLook closely.\nWhich state is north?\nA. Ohio\nB. Utah",
            },
            {"from": "gpt", "value": "A"},
        ],
    },
    {
        "id": "11",
        "conversations": [
            {
                "from": "human",
                "value": "Which closing is correct?\nFinish the letter.\nA. See you,\nJo\nB. see you,\nJo",
            },
            {"from": "gpt", "value": "B"},
        ],
    },
    {
        "id": "12",
        "image": "12/image.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?\nA. a cat\nB. a dog\nC. a cow\nD. a hen\nE. a fox"},
            {"from": "gpt", "value": "E"},
        ],
    },
]


def test_llava_questions_parse_into_problems(tmp_path):
    (p10, p11, p12) = sqa.load_llava_questions(write_json(tmp_path / "llava.json", LLAVA))
    assert p10 == Problem(
        pid="10",
        question="Which state is north?",
        choices=("Ohio", "Utah"),
        answer=0,
        hint="Read the map.\nLook closely.",
        image=None,
        names_image=True,
        subject=None,
        grade=None,
        split="test",
    )
    # Without a context the whole head is the question; an option may span lines.
    assert (p11.question, p11.hint, p11.choices, p11.answer) == (
        "Which closing is correct?\nFinish the letter.",
        "",
        ("See you,\nJo", "see you,\nJo"),
        1,
    )
    assert (p11.names_image, p12.choices[-1], p12.answer) == (False, "a fox", 4)


def test_llava_images_captions_and_ocr_come_from_data_dir(tmp_path, sqa_dir):
    write_png(sqa_dir / "images" / "test" / "10" / "image.png")
    write_json(sqa_dir / "captions.json", {"captions": {"10": "A map.", "12": "A farm."}})
    write_json(sqa_dir / "ocrs.json", {"texts": {"10": OCR_BOXES, "11": "not parsed: it names no image"}})
    p10, p11, p12 = sqa.load_llava_questions(write_json(tmp_path / "llava.json", LLAVA), sqa_dir)
    assert p10.image == sqa_dir / "images" / "test" / "10" / "image.png"
    assert (p10.caption, p10.ocr) == ("A map.", "Ohio, Utah")
    assert (p11.image, p11.caption) == (None, "")
    assert (p12.image, p12.names_image, p12.caption, p12.ocr) == (None, True, "A farm.", "")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"conversations": [{"from": "human", "value": "Q?\nA. x"}]}, "one human turn and one gpt turn"),
        ({"conversations": [{"from": "human", "value": "Q?\nx or y"}, {"from": "gpt", "value": "A"}]}, "no options"),
        ({"conversations": [{"from": "human", "value": "Q?\nA. x\nB. y"}, {"from": "gpt", "value": "C"}]}, "'C'"),
        (
            {"conversations": [{"from": "human", "value": "Context: c\nA. x"}, {"from": "gpt", "value": "A"}]},
            "no question between the context",
        ),
        ({"image": "99/image.png"}, "field 'image' must be '<id>/image.png', got '99/image.png'"),
    ],
)
def test_bad_llava_entry_names_file_entry_and_id(tmp_path, change, message):
    path = write_json(tmp_path / "llava.json", [LLAVA[0], LLAVA[1] | change])
    with pytest.raises(DataError) as err:
        sqa.load_llava_questions(path)
    assert str(err.value).startswith(f"{path}: entry 1 (id 11): ")
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def test_options_and_question_prompt(sqa_dir):
    three, one, two, four, *_ = text_only(sqa_dir)
    assert sqa.format_options(("Ohio", "Utah", "Texas")) == "(A) Ohio (B) Utah (C) Texas"
    instruction, input = sqa.question_prompt(one)
    assert instruction == (
        "Question: Which state is farthest north?\nOptions: (A) Ohio (B) Utah (C) Texas\n"
        "Answer with the letter of the correct option."
    )
    assert input == ""
    assert sqa.question_prompt(one, "captions")[1] == "Image: A map."
    assert sqa.question_prompt(one, "ocr")[1] == "Image text: Ohio, Utah"
    assert sqa.question_prompt(two, "captions")[1] == "Context: Count carefully."  # no image: nothing added
    assert sqa.question_prompt(four, "captions")[1] == "Context: Look.\nImage: A flag."
    assert sqa.question_prompt(four, "ocr")[1] == "Context: Look."  # its OCR found no text
    assert sqa.question_prompt(three) == (
        "Question: Is ice cold?\nOptions: (A) yes (B) no\nAnswer with the letter of the correct option.",
        "",
    )
    assert "### Input:\nContext: Look.\nImage: A flag.\n\n### Response:" in format_prompt(
        *sqa.question_prompt(four, "captions")
    )
    with pytest.raises(ValueError, match="image_context must be one of"):
        sqa.question_prompt(one, "pixels")


def test_answer_text_and_rows(sqa_dir):
    three, one, *_ = text_only(sqa_dir)
    assert sqa.answer_text(one) == "The answer is A."
    assert (
        sqa.answer_text(one, explanation="after")
        == "The answer is A.\nBECAUSE: Maps have a compass rose. Ohio is farthest north."
    )
    assert (
        sqa.answer_text(one, explanation="before")
        == "Maps have a compass rose. Ohio is farthest north.\nThe answer is A."
    )
    for explanation in ("after", "before"):  # nothing to explain with: the answer alone
        assert sqa.answer_text(three, explanation=explanation) == "The answer is A."
    with pytest.raises(ValueError, match="explanation must be one of"):
        sqa.answer_text(one, explanation="first")
    rows = sqa.to_rows([three, one], image_context="ocr")
    assert rows[0] == {
        "instruction": sqa.question_prompt(three)[0],
        "input": "",
        "output": "The answer is A.",
        "image": None,
    }
    assert rows[1]["input"] == "Image text: Ohio, Utah"
    assert rows[1]["image"] == str(sqa_dir / "images" / "test" / "1" / "image.png")


# ---------------------------------------------------------------------------------------------------------------
# Answer parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", 1),
        ("  B \n", 1),
        ("B.", 1),
        ("(B)", 1),
        ("B) Utah", 1),
        ("B. Utah", 1),
        ("B\nBECAUSE: Utah is north.", 1),  # a first line that is only a letter
        ("The answer is B.", 1),
        ("The answer is B", 1),
        ("the answer is (C).", 2),
        ("THE ANSWER IS D", 3),
        ("Looking at the map, the answer is A, since Ohio is north.", 0),
        ("The answer is A.\nBECAUSE: the answer is B.", 0),  # the first statement counts
        ("E", None),  # beyond the 4 options
        ("The answer is E.", None),
        ("Z.", None),
        ("b", None),  # lower case: "a" is also the article, so lower-case letters are never answers
        ("(b)", None),
        ("The answer is a mammal.", None),
        ("A cat is a mammal.", None),  # a capital word opening a sentence is not option A
        ("I think so.", None),
        ("AB", None),
        ("B: Utah", None),
        ("The answer is AB.", None),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_answer(text, expected):
    assert sqa.parse_answer(text, 4) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # What the untrained shelf `shapes` model answered 71 times of 200, and its plain variants.
        ("The correct answer is (B) red.", 1),
        ("The correct answer is B.", 1),
        ("the right answer is (C)", 2),
        ("The answer is: B", 1),
        ("The answer is option B.", 1),
        ("Answer: (B) red", 1),
        ("Answer: B", 1),
        ("Correct answer: (D)", 3),
        ("The shape is red.\nAnswer: (A) red", 0),  # "Answer:" opening a later line
        ("The correct answer is (B) red, not (A) blue.", 1),
        ("Hence the correct answer is (C).\nThe answer is B.", 1),  # the trained form first: what it read stays
        # Still no answer: more than one option named, or no answer statement.
        ("The correct answer is (B) or (C).", None),
        ("The answer is B or C.", None),
        ("The answer is B/C.", None),
        ("Answer: (A), (B)", None),
        ("(B) or (C)", None),
        ("The answer is A and B.", None),
        ("The correct answer is not (B).", None),
        ("The wrong answer is B.", None),
        ("My wrong answer: B", None),  # "answer:" is only a statement where it opens a line
        ("Answer with the letter of the correct option.", None),
        ("The correct answer is a red square.", None),
        ("Options: (A) blue (B) red (C) green", None),
    ],
)
def test_parse_answer_reads_the_common_forms_of_an_answer_statement(text, expected):
    assert sqa.parse_answer(text, 4) == expected


def test_parse_answer_needs_a_sensible_option_count():
    assert sqa.parse_answer("A", 1) == 0
    assert sqa.parse_answer("B", 1) is None
    with pytest.raises(ValueError, match="num_choices"):
        sqa.parse_answer("A", 0)


# ---------------------------------------------------------------------------------------------------------------
# Scores


def records_for(problems, preds):
    return [{"pid": p.pid, "pred": pred, "correct": pred == p.answer} for p, pred in zip(problems, preds)]


def test_score_by_hand(sqa_dir):
    problems = text_only(sqa_dir)  # pids 3, 1, 2, 4, 5, 6
    # 3 wrong, 1 right, 2 right, 4 right, 5 unparsed, 6 wrong
    records = records_for(problems, [1, 0, 1, 1, None, 1])
    scores = sqa.score(records, {p.pid: p for p in problems})
    # NAT 1,2,3: 2/3 | SOC 4,6: 1/2 | LAN 5: 0/1 | TXT 2,4,6: 2/3 | IMG 1,4,6 (6's file missing): 2/3
    # NO 3,5: 0/2 | G1-6 1,3,5: 1/3 | G7-12 2,4,6: 2/3 | Avg 3/6
    expected = {
        "NAT": 200 / 3,
        "SOC": 50.0,
        "LAN": 0.0,
        "TXT": 200 / 3,
        "IMG": 200 / 3,
        "NO": 0.0,
        "G1-6": 100 / 3,
        "G7-12": 200 / 3,
        "Avg": 50.0,
    }
    assert {c: scores[c] for c in sqa.COLUMNS} == pytest.approx(expected)
    assert scores["count"] == {
        "NAT": 3,
        "SOC": 2,
        "LAN": 1,
        "TXT": 3,
        "IMG": 3,
        "NO": 2,
        "G1-6": 3,
        "G7-12": 3,
        "Avg": 6,
    }
    assert scores["unparsed"] == 1
    assert sqa.format_table(scores).splitlines() == [
        "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |",
        "|---|---|---|---|---|---|---|---|---|",
        "| 66.67 | 50.00 | 0.00 | 66.67 | 66.67 | 0.00 | 33.33 | 66.67 | 50.00 |",
    ]


def test_columns_without_problems_are_none_not_zero(tmp_path):
    llava = sqa.load_llava_questions(write_json(tmp_path / "llava.json", LLAVA))  # no subject, no grade
    scores = sqa.score(records_for(llava, [0, 0, 4]), {p.pid: p for p in llava})
    assert {c: scores[c] for c in sqa.COLUMNS} == pytest.approx(
        {"NAT": None, "SOC": None, "LAN": None, "TXT": 100.0, "IMG": 100.0, "NO": 0.0, "G1-6": None, "G7-12": None}
        | {"Avg": 200 / 3}
    )
    assert scores["count"]["NAT"] == 0
    assert sqa.format_table(scores).splitlines()[2] == "| - | - | - | 100.00 | 100.00 | 0.00 | - | - | 66.67 |"
    with pytest.raises(ValueError, match="nothing to score"):
        sqa.score([], {})


def test_chance_is_the_expected_score_of_uniform_guessing(sqa_dir):
    problems = text_only(sqa_dir)  # option counts: 1 has 3, 5 has 4, the others 2
    scores = sqa.chance(problems)
    expected = {
        "NAT": 100 * (1 / 3 + 1 / 2 + 1 / 2) / 3,
        "SOC": 50.0,
        "LAN": 25.0,
        "TXT": 50.0,
        "IMG": 100 * (1 / 3 + 1 / 2 + 1 / 2) / 3,
        "NO": 100 * (1 / 2 + 1 / 4) / 2,
        "G1-6": 100 * (1 / 3 + 1 / 2 + 1 / 4) / 3,
        "G7-12": 50.0,
        "Avg": 100 * (1 / 3 + 1 / 2 * 4 + 1 / 4) / 6,
    }
    assert {c: scores[c] for c in sqa.COLUMNS} == pytest.approx(expected)
    assert scores["unparsed"] == 0 and scores["count"]["Avg"] == 6
    # Averaging many seeded random guesses converges on it.
    rng = random.Random(0)
    by_pid = {p.pid: p for p in problems}
    trials = [
        sqa.score(records_for(problems, [rng.randrange(len(p.choices)) for p in problems]), by_pid)["Avg"]
        for _ in range(4000)
    ]
    assert sum(trials) / len(trials) == pytest.approx(scores["Avg"], abs=1.0)


def test_score_refuses_inconsistent_records(sqa_dir):
    problems = {p.pid: p for p in text_only(sqa_dir)}
    with pytest.raises(ValueError, match="pid 42 has no problem"):
        sqa.score([{"pid": "42", "pred": 0, "correct": True}], problems)
    with pytest.raises(ValueError, match="pid 3 has more than one prediction"):
        sqa.score([{"pid": "3", "pred": 0, "correct": True}] * 2, problems)
    with pytest.raises(ValueError, match="pid 3: correct=True but pred=1 and the answer is 0"):
        sqa.score([{"pid": "3", "pred": 1, "correct": True}], problems)


# ---------------------------------------------------------------------------------------------------------------
# The real data (see /work/shared/data/scienceqa/SOURCES.md)


@pytest.fixture(scope="module")
def real(data_dir):
    root = data_dir / "scienceqa"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    return root


@pytest.mark.slow
def test_real_think_partial(real):
    # All 167 test problems of this partial file that name an image have their image staged here ...
    problems, missing = sqa.load_problems(real, "test", "problems_think_partial.json")
    assert (len(problems), missing) == (361, 0)
    assert sum(p.names_image for p in problems) == 167
    assert all(p.image is not None and p.image.is_file() for p in problems if p.names_image)
    assert sum(bool(p.caption) for p in problems) == 167
    # ... and no train or val image is.
    with pytest.raises(DataError, match=r"problem \d+: image .* not found \(521 of 1041 problems of split 'train'"):
        sqa.load_problems(real, "train", "problems_think_partial.json")
    assert sqa.load_problems(real, "val", "problems_think_partial.json", missing_images="text-only")[1] == 191


@pytest.mark.slow
def test_real_mmcot_subset(real):
    problems, missing = sqa.load_problems(
        real, "test", "problems_mmcot_subset150.json", splits_file="pid_splits_mmcot_subset150.json"
    )
    assert (len(problems), missing, sum(p.names_image for p in problems)) == (50, 0, 24)
    train, missing = sqa.load_problems(
        real, "train", "problems_mmcot_subset150.json", "pid_splits_mmcot_subset150.json", "text-only"
    )
    assert (len(train), missing) == (50, 22)
    rows = sqa.to_rows(problems, image_context="captions", explanation="after")
    assert all(row["output"].startswith("The answer is ") and "\nBECAUSE: " in row["output"] for row in rows)


@pytest.mark.slow
def test_real_llava_questions(real):
    problems = sqa.load_llava_questions(real / "llava_test_CQM-A.json", real)
    assert len(problems) == 4241
    assert sum(p.names_image for p in problems) == 2017
    assert sum(p.image is not None for p in problems) == 576  # the staged test images named image.png
    assert sum(p.caption != "" for p in problems if p.names_image) == 2017
    # The official test split, in the same order.
    assert [p.pid for p in problems] == json.loads((real / "pid_splits.json").read_text())["test"]


@pytest.mark.slow
def test_real_llava_agrees_with_problems_file(real):
    """LLaVA's questions against ScienceQA's own records, on the 361 test pids both hold.

    Choices, answers and whether an image is named agree everywhere. The text before the options agrees except:
    - 9 problems with a context AND a question of several lines: LLaVA's "Context: hint\\nquestion" cannot say
      where one ends, and the parser gives the question only its last line, so the rest lands in the hint;
    - 2 problems with a double space ("The  is adapted"), which LLaVA's converter collapsed;
    - 4 problems into whose hint Think-ScienceQA wrote a Punnett square ("This Punnett square is ff..."): the
      original hint, in problems_mmcot_subset150.json for pid 42, equals LLaVA's.
    """
    llava = {p.pid: p for p in sqa.load_llava_questions(real / "llava_test_CQM-A.json")}
    problems = text_only(real, problems_file="problems_think_partial.json")
    assert len(problems) == 361 and all(p.pid in llava for p in problems)

    for p in problems:
        q = llava[p.pid]
        assert (q.choices, q.answer, q.names_image) == (p.choices, p.answer, p.names_image), p.pid

    split_differently = {p.pid for p in problems if p.question != llava[p.pid].question}
    assert split_differently == {"78", "93", "627", "763", "1095", "1123", "1514", "1550", "1674"}
    for pid in split_differently:
        p, q = next(p for p in problems if p.pid == pid), llava[pid]
        head, _, last = p.question.rpartition("\n")
        assert (q.question, q.hint) == (last, f"{p.hint}\n{head}")

    def before_options(problem: Problem) -> str:
        return f"{problem.hint}\n{problem.question}" if problem.hint else problem.question

    differ = {p.pid for p in problems if before_options(p) != before_options(llava[p.pid])}
    assert differ == {"42", "209", "332", "600", "1412", "1714"}
    double_space = {p.pid for p in problems if before_options(p).replace("  ", " ") != before_options(llava[p.pid])}
    assert double_space == {"42", "209", "600", "1714"}
    for pid in double_space:
        hint = next(p.hint for p in problems if p.pid == pid)
        assert "This Punnett square is " in hint and "This Punnett square is " not in llava[pid].hint
    original = text_only(
        real, problems_file="problems_mmcot_subset150.json", splits_file="pid_splits_mmcot_subset150.json"
    )
    assert next(p.hint for p in original if p.pid == "42") == llava["42"].hint
