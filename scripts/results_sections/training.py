"""The sections on the training runs of the dev machine's CPU (`train/results/`): the shelf's adapters, the Alpaca run
and the coloured shapes that check the visual path."""

from .formatting import cell, command_block, epochs_text, loss, para, percent, seconds, short_float, speed, table
from .sources import load, note

SWEEP = "eval/results/scienceqa_sweep.json"


def shelf() -> list[str]:
    paths = {"alpaca": "train/results/shelf_alpaca.json", "shapes": "train/results/shelf_shapes.json"}
    a, s = load(paths["alpaca"]), load(paths["shapes"])
    sweep = load(SWEEP)
    samples = [
        [cell(row["instruction"] + (f" Input: {row['input']}" if row["input"] else "")), cell(row["base"]["text"]),
         cell(row["alpaca"]["text"])]
        for row in a["answers"][:3]
    ]  # fmt: skip
    return [
        "## The shelf: the adapters the package ships",
        "",
        *para(
            "`llama-adapter demo` opens with these, `llama-adapter adapters` lists them, and every command takes",
            "their names wherever it takes an adapter folder. Each is made by one script that writes its folder",
            "under `llama_adapter/shelf/` and its results file (ran on the 2-core CPU of the dev machine, fp32; the",
            "files record no device):",
        ),
        *command_block(a["command"]),
        *command_block(s["command"]),
        *shelf_table(a, s, sweep),
        *shelf_recipes(a, s, shelved_scienceqa(sweep)),
        *note(paths["alpaca"]),
        *note(paths["shapes"]),
        *para("The first three held-out instructions, greedy (long answers cut here, marked …):"),
        *table(["instruction", "base model", "`alpaca`"], samples),
    ]


def shelved_scienceqa(sweep: dict) -> str | None:
    """The sweep's recipe that `eval/scienceqa_sweep.py` put on the shelf, once the test stage has scored it."""
    chosen = sweep.get("chosen")
    return chosen if chosen and "test361" in sweep["recipes"][chosen] else None


def shelf_table(a: dict, s: dict, sweep: dict) -> list[str]:
    """Each shelf adapter against the base it starts from, on the measure its script trains it for."""
    losses, stop = a["val_loss_by_epoch"], a["stop_rate"]
    before, after = s["accuracy"]["untrained"], s["accuracy"]["shapes"]
    rows_trained = sum(count["kept"] for count in a["data"].values())
    chosen = shelved_scienceqa(sweep)

    def right(scored: dict) -> str:
        return f"{scored['accuracy']:.1f}% ({scored['right']}/{scored['of']})"

    return table(
        ["", "before (the base: zero gates)", "after"],
        [
            [
                f"`alpaca`: held-out loss ({percent(a['recipe']['val_fraction'], 0)} of {rows_trained:,} rows)",
                loss(losses[0]),
                f"**{loss(losses[-1])}**",
            ],
            [
                f"`alpaca`: answers ending with EOS within {a['max_new_tokens']} tokens (100 held-out instructions)",
                percent(stop["base"], 0),
                f"**{percent(stop['alpaca'], 0)}**",
            ],
            [
                f"`shapes`: held-out images answered right, greedy (options shuffled; chance {100 / 3:.1f}%)",
                right(before),
                f"**{right(after)}**",
            ],
            *([scienceqa_row(sweep, chosen)] if chosen else []),
        ],
    )


def scienceqa_row(sweep: dict, chosen: str) -> list[str]:
    guessing = sweep["chance"]["test361"]["Avg"]
    text_base = sweep["recipes"]["base model (zero gates), options by text"]
    return [
        f"`scienceqa`: ScienceQA test Avg, 361 problems, the likeliest option by its text (guessing {guessing:.2f})",
        f"{text_base['test361']['Avg']:.2f}",
        f"**{sweep['recipes'][chosen]['test361']['Avg']:.2f}**",
    ]


def shelf_recipes(a: dict, s: dict, chosen: str | None) -> list[str]:
    """How each shelf adapter was trained, and what its untrained base does instead."""
    losses, ending, before = a["val_loss_by_epoch"], a["ending"], s["accuracy"]["untrained"]
    return para(
        f"`alpaca`: LLaMA-Adapter, {a['summary']['trainable_parameters']:,} parameters, {a['recipe']['epochs']}",
        f"epochs ({a['summary']['steps']:,} steps of {a['recipe']['batch_size']}) on the Alpaca rows in",
        "`../shared/data/alpaca` but Code Alpaca, then",
        f"{ending['recipe']['epochs']} more ({ending['summary']['steps']:,} steps) at lr {ending['recipe']['lr']:g}",
        f"with the EOS ending each answer weighing {ending['recipe']['eos_weight']:g} in the loss (`--eos-weight`),",
        f"in {(a['summary']['wall_time_s'] + ending['summary']['wall_time_s']) / 3600:.1f} h. The first stage",
        "alone stopped on 87% (the shelf's `alpaca` of commit `2cced3d`, measured the same way): the answers",
        "that ran on mostly repeated a phrase with EOS the second most likely token, a little behind, and the",
        "second stage moves it ahead.",
        "Validation loss (EOS weighing 1) after each epoch:",
        ", ".join(loss(x) for x in losses[1:]) + ".",
        "`shapes`: the same adapter with a projection of CLIP's image embedding,",
        f"{s['summary']['trainable_parameters']:,} parameters, {s['summary']['steps']} steps on",
        f"{s['images']['train']} drawn images in {s['summary']['wall_time_s'] / 60:.0f} min, trained to name",
        'the colour before the letter ("The shape is red. The answer is B."): with the letter alone it stayed at',
        "chance. Untrained, the model answers in its own words whatever the image, most often",
        f'"{before["most_common_answer"][0]}" ({before["most_common_answer"][1]} of {before["of"]}), and',
        f"{picked_in_words(before['picked'])}.",
        f"**Its CLIP {s['visual']['clip_model']} is randomly initialised (seed {s['visual']['clip_seed']}) and",
        "frozen:** the adapter reads colour from random features; it does not understand pictures.",
        *(
            [
                f"`scienceqa`: the recipe {chosen}, chosen on validation by `python eval/scienceqa_sweep.py`,",
                "which writes it to the shelf; the whole sweep is [below](#scienceqa-what-each-ingredient-buys-evalscienceqa_sweeppy).",
            ]
            if chosen
            else []
        ),
    )


def picked_in_words(picked: dict[str, int]) -> str:
    """How often each letter was picked, in words (`train/shelf_shapes.py`'s card says it the same way)."""
    if len(picked) == 1 and "none" not in picked:
        [letter] = picked
        return f"it picked {letter} for every image, so it scored the share of images whose answer is {letter}"
    return "the letters it picked: " + ", ".join(f"{letter} {count}" for letter, count in picked.items())


def alpaca() -> list[str]:
    path = "train/results/alpaca_smollm2.json"
    r = load(path)
    c = r["config"]
    epochs = epochs_text(c["epochs"])
    drop = (r["val_loss_before"] - r["val_loss_after"]) / r["val_loss_before"]
    samples = []
    for s in r["samples"]:
        instruction = cell(s["instruction"]) + (f" Input: *{cell(s['input'])}*" if s["input"] else "")
        samples.append([instruction, cell(s["before"]), cell(s["after"])])
    runs_on = any("### Instruction" in s["after"] for s in r["samples"])
    return [
        "## Alpaca on the embedded SmolLM2-135M-Instruct, 2-core CPU",
        "",
        *para(
            f"Command (results in `{path}`, loss curve in `train/results/alpaca_smollm2_loss.png`; ran on the 2-core",
            "CPU of the dev machine, fp32, nothing else running; the file records no device):",
        ),
        *command_block("python train/alpaca_smollm2.py"),
        *para(
            "Stanford Alpaca rows from `../shared/data/alpaca/alpaca_small.json`,",
            f"{percent(c['val_fraction'], 0)} of them held out for validation; {epochs} at batch {c['batch_size']}",
            f"({r['steps']} steps), max length {c['max_len']}, lr {short_float(c['lr'])} with",
            f"{percent(c['warmup'], 0)} warm-up then cosine decay, LLaMA-Adapter in its default shape.",
        ),
        *alpaca_table(r, epochs),
        "![Training and validation loss of the Alpaca run](../train/results/alpaca_smollm2_loss.png)",
        "",
        *para("Greedy answers to held-out instructions, before and after (long answers cut here, marked …):"),
        *table(["instruction", "before (base model)", "after (adapter)"], samples),
        *para(
            f"What this shows and what it does not: the adapter learns (held-out loss down {percent(drop, 0)} in",
            f"{epochs} on a CPU, from exactly the base model's loss) and its answers take on Alpaca's longer list",
            f"style, but a 135M model after {r['steps']} small steps has not yet learnt to stop: answers",
            ("run on into a new `### Instruction:` or repeat." if runs_on else "repeat."),
            "SmolLM2-Instruct was already instruction-tuned, so the base is a strong start and the gain is modest.",
            "More epochs (the paper's recipe, which is `llama-adapter train`'s default) and a larger base are the",
            "levers.",
        ),
    ]


def alpaca_table(r: dict, epochs: str) -> list[str]:
    minutes = round(r["wall_time_s"] / 60)
    return table(
        ["", ""],
        [
            [
                "validation loss (response tokens) before: zero gates = the base model",
                f"**{loss(r['val_loss_before'])}**",
            ],
            [f"validation loss after {epochs}", f"**{loss(r['val_loss_after'])}**"],
            ["trainable parameters", f"{r['trainable_parameters']:,}"],
            ["checkpoint (`adapter.safetensors`)", f"{r['checkpoint_bytes']:,} bytes"],
            ["non-padding tokens trained", f"{r['train_tokens']:,}"],
            [
                "throughput (non-padding tokens trained per second)",
                f"{speed(r['tokens_per_s'])} tokens/s; {percent(r['padding_share'])} of batch positions were padding",
            ],
            [
                "wall time of the training loop (incl. the validations)",
                f"{seconds(r['wall_time_s'])} s ({minutes} min)",
            ],
        ],
    )


def colours() -> list[str]:
    path = "train/results/synthetic_colours.json"
    r = load(path)
    s = r["settings"]
    command = "python train/synthetic_colours.py" + (" --shuffle-choices" if s["shuffle_choices"] else "")
    return [
        "## Does the visual path learn? Coloured shapes, random CLIP, SmolLM2",
        "",
        *para(
            f"Command (results in `{path}`; ran on the 2-core CPU of the dev machine, fp32; the file records no",
            "device):",
        ),
        *command_block(command),
        *para(
            f"{s['train']} drawn images of a red, green or blue square, circle or triangle (random place and size),",
            'question "What colour is the shape? (A) red (B) green (C) blue",',
            f"{s['test']} held-out images; each adapter trained {s['steps']} steps at lr {short_float(s['lr'])} on the",
            "embedded SmolLM2; scored by likelihood.",
            f"**The CLIP {s['clip_model']} encoder is randomly initialised and frozen** (no pretrained CLIP weights",
            "exist offline), so this checks the wiring, not picture understanding.",
        ),
        *table(
            [
                "adapter",
                "held-out accuracy",
                "val loss before → after",
                "trainable parameters",
                "train tok/s",
                "train time",
            ],
            colours_rows(r),
        ),
        *para(
            "The question text is identical for every image, so a text-only adapter can only learn the answer prior.",
            "With `--shuffle-choices` the options come in random order per question, which also makes the model find",
            "the colour among the options"
            + (": the shelf's `shapes` adapter is trained that way (above)." if not s["shuffle_choices"] else "."),
        ),
    ]


def colours_rows(r: dict) -> list[list[str]]:
    """The adapter that sees the image against one trained on the same questions without it."""
    rows = []
    for key, label in (
        ("multimodal", f"multimodal (random frozen {r['settings']['clip_model']} + projection)"),
        ("text_only", "text-only (same data, no image)"),
    ):
        m = r[key]
        right = round(m["accuracy"] * m["questions"] / 100)
        accuracy = f"{m['accuracy']:.1f}% ({right}/{m['questions']})"
        if key == "multimodal":
            accuracy = f"**{accuracy}**"
        else:
            accuracy += f"; chance: {100 / 3:.1f}%"
        rows.append(
            [
                label,
                accuracy,
                f"{loss(m['val_loss_before'])} → {loss(m['val_loss_after'])}",
                f"{m['trainable_parameters']:,}",
                speed(m["tokens_per_s"]),
                f"{seconds(m['wall_time_s'])} s",
            ]
        )
    return rows
