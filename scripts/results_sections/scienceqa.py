"""The ScienceQA sections (`eval/results/`): the text-only adapter against chance, and the sweep of what each
ingredient of a recipe buys."""

from collections import Counter

from .formatting import command_block, loss, para, percent, seconds, short_float, speed, table
from .sources import REPO, load, note

COLUMNS = ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]


def scienceqa() -> list[str]:
    path = "eval/results/scienceqa_smollm2.json"
    r = load(path)
    s, rows = r["settings"], r["rows"]
    body, paper_random = scienceqa_table(rows)
    t, (n361, n4241) = rows["adapter"]["train"], question_counts(rows)
    return [
        "## ScienceQA, text-only adapter on the embedded SmolLM2-135M, 2-core CPU",
        "",
        *para(
            f"Command (results in `{path}` and `eval/results/scienceqa_smollm2.md`; ran on the 2-core CPU of the dev",
            "machine, fp32; the file records no device):",
        ),
        *command_block(scienceqa_command(s)),
        *para(
            "Every stage resumes, and the stages run most-wanted first.",
            f"The adapter ({t['trainable_parameters']:,} trainable parameters) is trained {s['epochs']} epochs on the",
            f"{s['train_problems']} train problems of `{s['problems']}`: {t['steps']} steps, lr {short_float(s['lr'])}",
            f"with warm-up and cosine decay, {seconds(t['wall_time_s'])} s at {speed(t['tokens_per_s'])} tokens/s;",
            f"validation loss {loss(t['val_loss_before'])} (zero gates) → {loss(t['val_loss_after'])}.",
            'Prompts give context, question and lettered options; the target is "The answer is X."',
            (
                "Scoring is by likelihood (the option whose answer sentence the model finds most likely; no parsing),"
                if s["scoring"] == "likelihood"
                else f"Scoring: {s['scoring']},"
            ),
            f"on the {n361} test problems that carry subject and grade metadata (all nine columns) and on all",
            f"{n4241} test questions of `llava_test_CQM-A.json` (no subject or grade there: context columns and Avg).",
            '"random guess (expected)" is the exact expectation of uniform guessing on the same questions; the',
            "paper's rows are quoted from the paper"
            + (f", and its random row ({paper_random}) was an empirical run." if paper_random else "."),
        ),
        *table(["model", *COLUMNS], body),
        *scienceqa_verdict(rows),
        *scienceqa_limits(s, rows),
    ]


def question_counts(rows: dict) -> tuple[int, int]:
    """How many questions the adapter answered: the 361 problems with metadata, and all the test questions."""
    return rows["adapter"]["test361"]["count"]["Avg"], rows["adapter"]["test4241"]["count"]["Avg"]


def scienceqa_command(s: dict) -> str:
    """The command as it would be typed: the script's defaults left out."""
    command = "python eval/scienceqa_smollm2.py"
    if s["epochs"] != 3:
        command += f" --epochs {s['epochs']}"
    if abs(s["lr"] - 5e-3) > 1e-9:
        command += f" --lr {s['lr']}"
    if s["scoring"] != "likelihood":
        command += f" --scoring {s['scoring']}"
    if s["full_test"]:
        command += " --full-test"
    if s["skip_captions"]:
        command += " --skip-captions"
    return command


def scienceqa_table(rows: dict) -> tuple[list[list[str]], str]:
    """Our measured rows, then the paper's; and the paper's random row's Avg, which it measured rather than computed."""
    body, ours = [], set()
    for name, row in rows.items():
        label = name if name.startswith("random") else f"SmolLM2-135M {name}"
        for test_set, suffix in (("test361", "361 test problems"), ("test4241", "all 4241 test questions")):
            if row.get(test_set):
                scores = row[test_set]
                cells = ["" if scores[col] is None else f"{scores[col]:.2f}" for col in COLUMNS]
                body.append([f"{label}, {suffix}", *cells])
                ours.add(f"{label}, {suffix}")
    # The paper's rows are not measurements of ours: they come from the table the script writes beside its JSON.
    paper_random = ""
    for line in (REPO / "eval/results/scienceqa_smollm2.md").read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] not in ours and not cells[0].startswith("SmolLM2") and not cells[0].startswith("random guess"):
            body.append(cells)
            if cells[0].startswith("random,"):
                paper_random = cells[-1]
    return body, paper_random


def two_standard_errors(guess: dict) -> float:
    """Two standard errors of uniform guessing's Avg, in points: a score closer to guessing than this is chance."""
    p, n = guess["Avg"] / 100, guess["count"]["Avg"]
    return 2 * 100 * (p * (1 - p) / n) ** 0.5


def scienceqa_verdict(rows: dict) -> list[str]:
    """Whether the adapter beats guessing, and whether the images' captions help it."""
    guess, base, adapter = rows["random guess (expected)"], rows["base model (zero gates)"], rows["adapter"]
    captions, t, (n361, n4241) = rows.get("adapter + captions"), adapter["train"], question_counts(rows)
    at_chance = all(
        abs(adapter[test]["Avg"] - guess[test]["Avg"]) < two_standard_errors(guess[test])
        for test in ("test361", "test4241")
    )
    verdict = "**this adapter is at chance.**" if at_chance else "**this adapter is above chance.**"
    out = para(
        f"Plainly: {verdict} On the {n361} problems it scores {adapter['test361']['Avg']:.2f} against",
        f"{guess['test361']['Avg']:.2f} expected from guessing (two standard errors of guessing there:",
        f"±{two_standard_errors(guess['test361']):.1f}",
        f"points), and the untrained base {base['test361']['Avg']:.2f}; on all {n4241} test questions",
        f"{adapter['test4241']['Avg']:.2f} against {guess['test4241']['Avg']:.2f}",
        f"(the untrained base: {base['test4241']['Avg']:.2f})." if base.get("test4241") else ".",
        f"Its validation loss falls a long way ({loss(t['val_loss_before'])} → {loss(t['val_loss_after'])})",
        "while its accuracy does not move: it learns the answer's format, not the answer.",
    )
    if captions:
        ct = captions["train"]
        helps = captions["test361"]["Avg"] > adapter["test361"]["Avg"]
        out += para(
            "Giving the images' machine captions as context (`--image-context captions`, the trick of ScienceQA's",
            "text-only baselines; the adapter trained the same way with captions in its prompts,",
            f"{ct['steps']} steps, {seconds(ct['wall_time_s'])} s at {speed(ct['tokens_per_s'])} tokens/s while other",
            f"work shared the CPU, validation loss {loss(ct['val_loss_before'])} → {loss(ct['val_loss_after'])})",
            ("helps" if helps else "does not help either")
            + f": {captions['test361']['Avg']:.2f} on the {n361} problems.",
        )
    return out


def scienceqa_limits(s: dict, rows: dict) -> list[str]:
    captions, (_, n4241) = rows.get("adapter + captions"), question_counts(rows)
    return para(
        "What limits these numbers: a 135M-parameter base (the paper used LLaMA-7B),",
        f"{s['train_problems']} training problems (the full train split is not available offline),",
        f"{s['epochs']} CPU epochs, and no images (no train images exist here, and the CLIP encoder would be random).",
        "The same steps through `llama-adapter train` and `llama-adapter eval scienceqa` with `--base` pointing at a",
        "LLaMA-7B folder and the full ScienceQA download are the way to the paper's numbers; they have not been run",
        "here.",
        *(
            [f"Not measured: the captions adapter on all {n4241} questions (its predictions file resumes)."]
            if captions and not captions.get("test4241")
            else []
        ),
    )


def scienceqa_sweep() -> list[str]:
    path = "eval/results/scienceqa_sweep.json"
    if not (REPO / path).is_file():
        return []
    r = load(path)
    settings, base = r["settings"], r["recipes"]["base model (zero gates)"]
    return [
        "## ScienceQA: what each ingredient buys (`eval/scienceqa_sweep.py`)",
        "",
        *para(
            f"Command (results in `{path}` and `eval/results/scienceqa_sweep.md`; ran on the dev machine's",
            f"{settings['device']}, {settings['precision']}, torch {settings['torch']}):",
        ),
        *command_block("python eval/scienceqa_sweep.py"),
        *para(
            "Each recipe trains a fresh adapter on the embedded SmolLM2-135M-Instruct from the 1,041 train problems",
            f"of `{settings['problems']}` (text-only: no train images exist here, and CLIP would be random), in",
            f"batches of {settings['batch_size']}, and is scored on the {base['val']['count']['Avg']} validation",
            "problems by the most likely option; a recipe that puts the lecture and solution before the answer",
            "generates them (up to 512 tokens) and is scored by the answer it then names, read from its text",
            "(`scienceqa.parse_option_text`; an answer naming no option counts as wrong). The recipe with the",
            "best validation Avg, and the untrained base",
            "beside it, are then scored once on the 361 test problems with metadata and on all 4241 test questions;",
            "the test questions choose nothing. Every score carries its 95% bootstrap interval (1,000 draws of the",
            "problems), and each ingredient's difference a paired one (both recipes' answers to the same draws).",
        ),
        *(REPO / "eval/results/scienceqa_sweep.md").read_text().splitlines(),
        "",
        *sweep_validation(r),
        *sweep_test(r),
        *note(path),
        *sweep_letters(r),
    ]


def trained_recipes(r: dict) -> dict[str, dict]:
    """The recipes that trained an adapter and have been scored on validation (the bases train nothing)."""
    return {name: cell for name, cell in r["recipes"].items() if cell.get("recipe", {}).get("steps") and "val" in cell}


def avg(scores: dict) -> str:
    low, high = scores["interval"]["Avg"]
    return f"{scores['Avg']:.2f} (95% CI {low:.1f} to {high:.1f})"


def sweep_validation(r: dict) -> list[str]:
    """The best recipe on validation, and which ingredients moved the score beyond the bootstrap's noise."""
    recipes, trained, found = r["recipes"], trained_recipes(r), r.get("ingredients", [])
    base, base_text = recipes["base model (zero gates)"], recipes.get("base model (zero gates), options by text")
    best = max(trained, key=lambda name: trained[name]["val"]["Avg"])
    bought = [f"{f['ingredient']} bought {f['difference']:+.2f}" for f in found if f["interval"][0] > 0]
    cost = [f"{f['ingredient']} cost {-f['difference']:.2f}" for f in found if f["interval"][1] < 0]
    noise = [f["ingredient"] for f in found if f["interval"][0] <= 0 <= f["interval"][1]]
    return para(
        f"On validation the best recipe, {best}, scores {avg(trained[best]['val'])}, against",
        f"{r['chance']['val']:.2f} expected from guessing and {base['val']['Avg']:.2f} for the untrained base"
        + (f" ({base_text['val']['Avg']:.2f} when its options are scored by their text)." if base_text else "."),
        *([f"Beyond noise, {'; '.join(bought + cost)}."] if bought or cost else []),
        *([f"Within noise (the paired interval holds 0): {', '.join(noise)}."] if noise else []),
    )


def sweep_test(r: dict) -> list[str]:
    """The chosen recipe on the test sets against issue 25's goal, and the recipes still to run."""
    recipes, chance, chosen = r["recipes"], r["chance"], r.get("chosen")
    if chosen and "test4241" in recipes[chosen]:
        test361, test4241 = recipes[chosen]["test361"], recipes[chosen]["test4241"]
        met = test361["Avg"] >= 55 and test4241["Avg"] >= 50
        bases = [
            cell["test361"]["Avg"]
            for cell in (recipes["base model (zero gates)"], recipes.get("base model (zero gates), options by text"))
            if cell and "test361" in cell
        ]
        out = para(
            f"On test, {chosen} scores {avg(test361)} on the 361 problems and {avg(test4241)} on all 4241",
            f"(guessing: {chance['test361']['Avg']:.2f} and {chance['test4241']:.2f}; the untrained base on the 361:",
            " and ".join(f"{score:.2f}" for score in bases) + ", scored by letter and by text).",
            "The goal of issue 25, 55 on the 361 and 50 on all 4241, is " + ("met." if met else "**not met**."),
        )
    else:
        out = para(
            "Not measured yet: the test stage (the recipe chosen on validation, scored on the 361 and the 4241)."
        )
    missing = [name for name in r.get("planned", []) if name not in trained_recipes(r)]
    return out + (para(f"Recipes of the script not run yet (each resumes): {', '.join(missing)}.") if missing else [])


def sweep_letters(r: dict) -> list[str]:
    """Why the recipes that answer with a letter stay near guessing: they learn the commonest letter."""
    trained = trained_recipes(r)
    letter_form = [n for n, c in trained.items() if c["recipe"].get("answer_form", "letter") == "letter"]
    shares = {n: max(trained[n]["val"]["picked"].values()) / trained[n]["val"]["count"]["Avg"] for n in letter_form}
    commonest = Counter(
        max(trained[n]["val"]["picked"], key=trained[n]["val"]["picked"].get) for n in letter_form
    ).most_common(1)
    return para(
        "Why letters fail here: trained to answer with a letter, the adapters learn which letter is common rather",
        "than which option is right:",
        *(
            [
                f"their commonest answer, {commonest[0][0]} for {commonest[0][1]} of {len(letter_form)}, is",
                f"{percent(min(shares.values()), 0)} to {percent(max(shares.values()), 0)} of their validation answers.",
            ]
            if shares
            else []
        ),
        "ScienceQA's own small",
        "baseline, UnifiedQA-base (223M parameters), reached 70.12 only after fine-tuning on the full train split,",
        "12,726 problems, twelve times the 1,041 here. Naming the option by its text lets the model use what it",
        "knows about the words. What would move the numbers further: the full train split (its problems.json is",
        "not available offline), a larger base, and for the image questions a pretrained CLIP (none is here).",
    )
