"""The predictions file: records appended and flushed one by one, a torn last line dropped, bad lines named, and a
resumed evaluation refused when its settings differ."""

import json

import pytest
from test_scienceqa import sqa_dir, text_only  # noqa: F401 - the ScienceQA fixture folder

from llama_adapter.data.sources import DataError
from llama_adapter.evaluation import scienceqa as sqa
from llama_adapter.evaluation.predictions import append_prediction, check_resume_settings, read_predictions


def test_predictions_resume_after_a_torn_last_line(sqa_dir, tmp_path):  # noqa: F811
    three, one, two, *_ = text_only(sqa_dir)
    path = tmp_path / "preds.jsonl"
    assert read_predictions(path, sqa.PREDICTION_FIELDS) == {}
    first = sqa.prediction_record(three, "prompt 3", "The answer is A.")
    assert first == {
        "pid": "3",
        "prompt": "prompt 3",
        "output": "The answer is A.",
        "pred": 0,
        "pred_letter": "A",
        "answer": 0,
        "correct": True,
    }
    with path.open("a") as handle:
        append_prediction(handle, first, sqa.PREDICTION_FIELDS)
    with path.open("a") as handle:  # a crash half-way through the second record
        handle.write(json.dumps(sqa.prediction_record(one, "prompt 1", "B"))[:25])
    assert read_predictions(path, sqa.PREDICTION_FIELDS) == {"3": first}
    assert path.read_text() == json.dumps(first) + "\n"  # the fragment is gone, appends start on a fresh line
    second = sqa.prediction_record(two, "prompt 2", "I cannot tell.")
    assert (second["pred"], second["pred_letter"], second["correct"]) == (None, None, False)
    with path.open("a") as handle:
        append_prediction(handle, second, sqa.PREDICTION_FIELDS)
    assert list(read_predictions(path, sqa.PREDICTION_FIELDS)) == ["3", "2"]


def test_bad_prediction_lines_name_file_and_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    one, two = (json.dumps(dict.fromkeys(sqa.PREDICTION_FIELDS) | {"pid": pid}) for pid in "12")
    path.write_text(f'{one}\n{{"pid": \n')
    with pytest.raises(DataError, match=r"preds.jsonl: line 2: not a JSON record"):
        read_predictions(path, sqa.PREDICTION_FIELDS)
    path.write_text(f'{one}\n["1"]\n')
    with pytest.raises(DataError, match=r"preds.jsonl: line 2: expected an object with a string 'pid'"):
        read_predictions(path, sqa.PREDICTION_FIELDS)
    path.write_text(f'{one}\n{{"pid": "2", "output": "A"}}\n')
    with pytest.raises(DataError, match=r"preds.jsonl: line 2: not a prediction record: no prompt, pred, pred_letter"):
        read_predictions(path, sqa.PREDICTION_FIELDS)
    path.write_text(f"{one}\n{two}\n{one}\n")
    with pytest.raises(DataError, match=r"preds.jsonl: line 3: pid 1 already predicted on line 1"):
        read_predictions(path, sqa.PREDICTION_FIELDS)
    with path.open("a") as handle, pytest.raises(ValueError, match="prediction record lacks prompt, output"):
        append_prediction(
            handle, {"pid": "1", "pred": 0, "pred_letter": "A", "answer": 0, "correct": True}, sqa.PREDICTION_FIELDS
        )


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "preds.jsonl"
    check_resume_settings(out, {"scoring": "generate"})
    out.write_text("")
    check_resume_settings(out, {"scoring": "generate"})
    with pytest.raises(ValueError, match="other settings"):
        check_resume_settings(out, {"scoring": "likelihood"})
