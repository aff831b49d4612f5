"""ScienceQA (Lu et al. 2022): problems (load.py; the hub's Parquet layout: hub.py), prompts and answer parsing
(prompts.py), scores (score.py).

Evaluation has two stages, as in LLaVA: generation appends one JSON line per problem to a predictions file
(evaluation.py, predictions.py), so a crashed run resumes where it stopped; scoring is a pure function of those
records and the problems, with ScienceQA's official categories.
"""

from .load import LETTERS, MISSING_IMAGES, SUBJECTS, Problem, load_llava_questions, load_problems
from .prompts import (
    IMAGE_CONTEXTS,
    answer_text,
    format_options,
    parse_answer,
    question_instruction,
    question_prompt,
    to_rows,
)
from .score import COLUMNS, PREDICTION_FIELDS, chance, format_table, prediction_record, score

__all__ = [
    "COLUMNS", "IMAGE_CONTEXTS", "LETTERS", "MISSING_IMAGES", "PREDICTION_FIELDS", "SUBJECTS", "Problem",
    "answer_text", "chance", "format_options", "format_table", "load_llava_questions", "load_problems",
    "parse_answer", "prediction_record", "question_instruction", "question_prompt", "score", "to_rows",
]  # fmt: skip
