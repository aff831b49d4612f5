"""A visual question only a model that sees the image can answer: "What colour is the shape?"

Each image is drawn here: one square, circle or triangle in red, green or blue, at a random place and size on
white. The question text is the same for every image, so a text-only adapter can only guess (1 in 3); a
multimodal adapter can read the colour from its CLIP features even when the encoder is random and frozen. This
checks the visual wiring end to end without pretrained CLIP weights, which do not exist offline.
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..evaluation.scienceqa import Problem, to_rows

COLOURS = {"red": (205, 40, 40), "green": (40, 160, 60), "blue": (45, 70, 215)}
SHAPES = ("square", "circle", "triangle")
QUESTION = "What colour is the shape?"


def make_colour_problems(
    folder: str | Path, count: int, seed: int = 0, shuffle_choices: bool = True, size: int = 64
) -> list[Problem]:
    """Draw `count` images into `folder` and return their multiple-choice problems.

    With `shuffle_choices` the options come in a random order per problem, so the answer's letter says nothing
    by itself: the model has to read the colour from the image and find it among the options.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    problems = []
    for index in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        path = folder / f"{seed}-{index:05d}.png"  # the name says nothing about the content
        draw_shape(shape, COLOURS[colour], size, rng).save(path)
        choices = list(COLOURS)
        if shuffle_choices:
            rng.shuffle(choices)
        problems.append(
            Problem(
                pid=f"colour-{seed}-{index}",
                question=QUESTION,
                choices=tuple(choices),
                answer=choices.index(colour),
                hint="",
                image=path,
                names_image=True,
                subject=None,
                grade=None,
                split="synthetic",
            )
        )
    return problems


def draw_shape(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    extent = rng.randint(size // 4, size // 2)
    left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (left, top, left + extent, top + extent)
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(left, top + extent), (left + extent, top + extent), (left + extent // 2, top)], fill=colour)
    return image


def rows_saying_the_colour(problems) -> list[dict]:
    """ScienceQA's rows, each answer naming the colour before the letter: "The shape is red. The answer is B."

    With the options shuffled, "The answer is B." alone has to find the image's colour among the options within the
    one token of the letter: 150 steps of that stayed at chance (a loss of ln 3 on the letter). Said first, the colour
    splits the task into two that the model learns: the colour from the image, then the letter of the option named so.
    """
    rows = to_rows(problems)
    for row, problem in zip(rows, problems):
        row["output"] = f"The shape is {problem.choices[problem.answer]}. {row['output']}"
    return rows
