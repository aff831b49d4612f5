"""ScienceQA (Lu et al. 2022): problems (load.py; the hub's Parquet layout: hub.py; more science problems to train
on: extra.py), prompts and answer parsing (prompts.py), scores (score.py).

Evaluation has two stages, as in LLaVA: generation appends one JSON line per problem to a predictions file
(predict.py, predictions.py), so a crashed run resumes where it stopped; scoring is a pure function of those
records and the problems, with ScienceQA's official categories.
"""

from .extra import load_choice_problems
from .load import load_llava_questions, load_problems
from .problems import LETTERS, MISSING_IMAGES, SUBJECTS, Problem
from .prompts import (
    ANSWER_FORMS,
    EXPLANATIONS,
    IMAGE_CONTEXTS,
    answer_text,
    format_options,
    option_targets,
    parse_answer,
    parse_option_text,
    question_instruction,
    question_prompt,
    to_rows,
)
from .score import (
    COLUMNS,
    PREDICTION_FIELDS,
    bootstrap_difference,
    bootstrap_intervals,
    chance,
    format_table,
    prediction_record,
    score,
)

__all__ = [
    "ANSWER_FORMS", "COLUMNS", "EXPLANATIONS", "IMAGE_CONTEXTS", "LETTERS", "MISSING_IMAGES", "PREDICTION_FIELDS", "SUBJECTS",
    "Problem", "answer_text", "bootstrap_difference", "bootstrap_intervals", "chance", "format_options",
    "format_table", "load_choice_problems", "load_llava_questions", "load_problems", "option_targets",
    "parse_answer", "parse_option_text", "prediction_record", "question_instruction", "question_prompt", "score", "to_rows",
]  # fmt: skip
