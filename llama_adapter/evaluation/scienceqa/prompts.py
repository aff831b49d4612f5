"""ScienceQA as prompts and targets (LLaMA-Adapter's and MM-CoT's shape), and a model's answer read back."""

import re
from collections.abc import Iterable
from dataclasses import replace

from .problems import LETTERS, Problem

IMAGE_CONTEXTS = ("none", "captions", "ocr")
EXPLANATIONS = ("none", "after", "before")  # where the target puts the lecture and solution
ANSWER_FORMS = ("letter", "text")  # how the target names the option: 'The answer is B.' or by the option's own text


def format_options(choices: Iterable[str]) -> str:
    """('x', 'y') -> '(A) x (B) y', the options line of the LLaMA-Adapter and MM-CoT ScienceQA prompts."""
    return " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, choices))


def question_instruction(question: str, choices: Iterable[str]) -> str:
    """The question and its lettered options, as the instruction of an Alpaca prompt."""
    return f"Question: {question}\nOptions: {format_options(choices)}\nAnswer with the letter of the correct option."


def question_prompt(problem: Problem, image_context: str = "none") -> tuple[str, str]:
    """(instruction, input) for the Alpaca template: the question and options, then the context, if any.

    `image_context` adds a text stand-in for the image to the context ("captions": its machine caption, "ocr": the
    text read from it), for text-only models; it only applies to problems with an image.
    """
    if image_context not in IMAGE_CONTEXTS:
        raise ValueError(f"image_context must be one of {IMAGE_CONTEXTS}, got {image_context!r}")
    instruction = question_instruction(problem.question, problem.choices)
    context = []
    if problem.hint:
        context.append(f"Context: {problem.hint}")
    if problem.names_image and image_context == "captions" and problem.caption:
        context.append(f"Image: {problem.caption}")
    if problem.names_image and image_context == "ocr" and problem.ocr:
        context.append(f"Image text: {problem.ocr}")
    return instruction, "\n".join(context)


def answer_text(problem: Problem, explanation: str = "none", answer_form: str = "letter") -> str:
    """The target response: 'The answer is B.' (or with `answer_form` "text", the option's own text: 'The answer is
    carbon dioxide.'), with its lecture and solution (MM-CoT's rationale) "after" it, as 'The answer is B.\nBECAUSE:
    ...' (the paper's answer-first order), or "before" it, as '...\nThe answer is B.' (the model reasons before it
    answers; only generation can score that). A problem with neither is answered alone."""
    if explanation not in EXPLANATIONS:
        raise ValueError(f"explanation must be one of {EXPLANATIONS}, got {explanation!r}")
    if answer_form not in ANSWER_FORMS:
        raise ValueError(f"answer_form must be one of {ANSWER_FORMS}, got {answer_form!r}")
    named = LETTERS[problem.answer] if answer_form == "letter" else problem.choices[problem.answer]
    answer = f"The answer is {named}."
    if explanation == "none":
        return answer
    because = f"{problem.lecture} {problem.solution}".strip()
    if not because:  # a few problems have neither (14 of the 1,041 train problems here)
        return answer
    return f"{answer}{_BECAUSE} {because}" if explanation == "after" else f"{because}\n{answer}"


_BECAUSE = "\nBECAUSE:"


def option_targets(problem: Problem, explanation: str = "none", answer_form: str = "letter") -> tuple[list[str], bool]:
    """What likelihood scoring compares: each option's target up to where the targets of `explanation` part ways
    with the answer, and whether that is their end (then the EOS after it counts too).

    Answer-first targets are cut after '\nBECAUSE:', so the answer's tokens are those training saw ('.' and '\n'
    may be one token). Explanation-first targets give their answer only after the explanation: generate instead.
    """
    if explanation == "before":
        raise ValueError("an explanation-first target answers after its explanation: score it with generation")
    answers = [answer_text(replace(problem, answer=i), answer_form=answer_form) for i in range(len(problem.choices))]
    return ([text + _BECAUSE for text in answers], False) if explanation == "after" else (answers, True)


def to_rows(
    problems: Iterable[Problem], image_context: str = "none", explanation: str = "none", answer_form: str = "letter"
) -> list[dict]:
    """Alpaca rows {instruction, input, output, image}, image being the image file's path or None."""
    rows = []
    for problem in problems:
        instruction, input = question_prompt(problem, image_context)
        output = answer_text(problem, explanation, answer_form)
        image = str(problem.image) if problem.image is not None else None
        rows.append({"instruction": instruction, "input": input, "output": output, "image": image})
    return rows


# Answer statements. First the form the targets train, "The answer is B.", read as it always was; only where there is
# none, the other common forms: "The correct answer is (B) red.", "the answer is: option B", a line opening "Answer:"
# ("my wrong answer: B" and "the wrong answer is B" are none). So these forms change no answer read before them;
# only a second letter does ("The answer is B or C." names no one option).
_STATEMENT = r"(?:\bthe (?:correct |right |final )?answer is:?|^[ \t]*(?:correct |final )?answer:)"
# Capital letters only, here and below: "a" is the English article, so "a cat ..." must not read as option A.
_ANSWER_IS = re.compile(r"the answer is\s*\(?([A-Z])\)?(?=$|[\s.,;:!])", re.IGNORECASE)
_ANSWER_STATEMENT = re.compile(
    _STATEMENT + r"\s*(?:option |choice )?\(?([A-Z])\)?(?=$|[\s.,;:!])", re.IGNORECASE | re.MULTILINE
)
_LEADING_LETTER = re.compile(r"\(([A-Z])\)|([A-Z])(?:[.)]|$)")
_ANOTHER_LETTER = re.compile(r"\s*(?:,|/|\bor\b|\band\b)\s*\(?([A-Z])\)?(?=$|[\s.,;:!])")  # "B or C", "(A), (B)"
_TEXT_ANSWER_IS = re.compile(r"the answer is ", re.IGNORECASE)
_TEXT_ANSWER_STATEMENT = re.compile(_STATEMENT + " ", re.IGNORECASE | re.MULTILINE)


def parse_answer(text: str, num_choices: int) -> int | None:
    """The option index a model's output picks, or None when it picks none clearly.

    Accepted: a first line that is only a letter ("B"), a letter opening the text as "B.", "B)" or "(B)"; else the
    first "the answer is B" anywhere (any case, the letter optionally in parentheses); else the first other answer
    statement: "The correct answer is (B) red.", "the answer is: option B", a line opening "Answer: (B)". The letter
    must be a capital and name one of the `num_choices` options, and no second option may follow it ("B or C",
    "(A), (B)"). A bare capital word opening a sentence ("A cat is ...") is no answer.
    """
    if not 1 <= num_choices <= len(LETTERS):
        raise ValueError(f"num_choices must be in 1..{len(LETTERS)}, got {num_choices}")
    text = text.strip()
    first_line = text.split("\n", 1)[0].strip()
    if leading := _LEADING_LETTER.match(first_line):
        found, said = leading, first_line
    else:
        found, said = _ANSWER_IS.search(text) or _ANSWER_STATEMENT.search(text), text
    if found is None:
        return None
    letter = next(group for group in found.groups() if group)
    # IGNORECASE also lowers the letter class; check the case here so "the answer is a ..." stays unparsed.
    if not letter.isupper() or LETTERS.index(letter) >= num_choices:
        return None
    another = _ANOTHER_LETTER.match(said, found.end())
    if another and LETTERS.index(another.group(1)) < num_choices:
        return None
    return LETTERS.index(letter)


def parse_option_text(text: str, choices: tuple[str, ...]) -> int | None:
    """The option a text-form answer names, after the first 'The answer is ' that names one; else after the first
    other answer statement that does ('The correct answer is ', a line opening 'Answer: ', any case); else None.

    An answer names an option by its exact text followed by '.', a line break or the end (the longest such option,
    so 'cat food' is not read as 'cat'), or, failing that, by its opening alone: its words up to the answer's first
    '.' (after an optional 'the '), where the option goes on with '.' or ':' ('circular reasoning' for 'circular
    reasoning: an argument that ...', the first sentence of a two-sentence option) and no other option opens so.
    In the other statements a letter may come first ('(B) cat food'), but it must be that option's; a letter alone
    names none. Case counts: ScienceQA asks which capitalisation is right ('Dear Pablo,' or 'dear Pablo,')."""
    for found in _TEXT_ANSWER_IS.finditer(text):  # the form the targets train, read as it always was
        named = _named_option(text[found.end() :], choices)
        if named is not None:
            return named
    for found in _TEXT_ANSWER_STATEMENT.finditer(text):
        rest = text[found.end() :]
        lettered = re.match(r"\(([A-Z])\) ", rest)
        named = _named_option(rest[lettered.end() :] if lettered else rest, choices)
        if named is not None and (not lettered or lettered.group(1) == LETTERS[named]):
            return named
    return None


def _named_option(said: str, choices: tuple[str, ...]) -> int | None:
    """The option `said` opens with: its whole text, else its opening alone (see parse_option_text); else None."""
    whole = [i for i, choice in enumerate(choices) if re.match(re.escape(choice) + r"(?:\.|\n|$)", said)]
    if whole:
        return max(whole, key=lambda i: len(choices[i]))
    opening = re.match(r"(?:the )?([^.\n]*)", said).group(1).strip()
    opened = [
        i
        for i, choice in enumerate(choices)
        if opening and re.fullmatch(re.escape(opening) + r"(?:[.:].*)?", choice, re.DOTALL)
    ]
    return opened[0] if len(opened) == 1 else None
