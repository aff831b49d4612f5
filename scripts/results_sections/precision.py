"""Precision that follows the hardware: the shelf adapters' answers in bf16 against fp32, and likelihood scoring of
ScienceQA's whole test set in the answering default."""

from .formatting import loss, para, percent, seconds, table
from .sources import load, provenance


def precision() -> list[str]:
    path = "bench/results/precision.json"
    r = load(path)
    body = [
        [
            f"`{name}`",
            str(x["max_new_tokens"]),
            f"{x['same']}/{r['prompts']} ({percent(x['share_same'])})",
            *(loss(x["reference_loss"][p]) if x["reference_loss"] else "–" for p in ("fp32", "bf16")),
            *(percent(x["accuracy"][p]) if x["accuracy"] else "–" for p in ("fp32", "bf16")),
            seconds(x["seconds"]["fp32"]),
            seconds(x["seconds"]["bf16"]),
            f"**{x['bf16_speedup']:.2f}**",
        ]
        for name, x in r["adapters"].items()
    ]
    alpaca = r["adapters"]["alpaca"]
    return [
        f"### Answering in bf16: `{r['command']}`",
        "",
        *provenance(path, r),
        *para(
            "Where the machine computes bf16 fast (a CUDA GPU with it; a CPU with AVX512-BF16 or AMX, as this one),",
            "`chat`, `demo`, `serve` and `eval` load the base in bf16 unless `--precision` says otherwise; training",
            "keeps fp32 on a CPU. Greedy answers of each shelf adapter to the same held-out prompts in both precisions,",
            "batches of 16, compared as text (`shapes` with its randomly initialised CLIP encoder, as it trained):",
        ),
        *table(
            [
                "adapter",
                "answer tokens at most",
                "same answer",
                "reference loss fp32",
                "bf16",
                "right fp32",
                "bf16",
                "fp32 s",
                "bf16 s",
                "bf16 speed-up",
            ],
            body,
        ),  # fmt: skip
        *para(
            "The reference loss is the held-out reference answers' mean negative log-likelihood per token",
            "(teacher-forced): it says whether bf16 answers as well, where comparing texts says only whether it",
            f"answers alike. Long free answers part ways at the first near-tie a rounding flips ({alpaca['same']} of",
            f"`alpaca`'s {r['prompts']} are the same over {alpaca['max_new_tokens']} tokens), and greedy decoding",
            "goes on from there; the losses and the right answers are the measure of quality.",
        ),
    ]


def scienceqa_scoring() -> list[str]:
    path = "bench/results/scienceqa_scoring.json"
    r = load(path)
    check, other = r["check"], "fp32" if r["precision"] == "bf16" else "bf16"
    met = r["seconds"] / 60 < r["goals"]["all_test_minutes"]
    return [
        f"### Scoring ScienceQA's test set by likelihood: `{r['command']}`",
        "",
        *provenance(path, r),
        *para(
            f"The README's likelihood evaluation with the shelf's `scienceqa` adapter on all {r['questions']:,} test",
            f"questions (LLaVA's copy, captions as context) took {seconds(r['seconds'])} s",
            f"({r['seconds'] / 60:.1f} minutes, the model's loading included; {r['questions_per_s']:.1f} questions/s)",
            f"in {r['precision']}, accuracy {percent(r['accuracy'])}: the goal of under",
            f"{r['goals']['all_test_minutes']:.0f} minutes is {'met' if met else 'missed'}.",
            f"Batches of {r['batch_size']} questions of about the same length run their prompts together, and each",
            "question's options run packed in one row after its prompt, the words they all begin with once.",
        ),
        *table(
            ["first questions", "same answer one at a time", f"same answer in {other}", "accuracy", f"in {other}"],
            [
                [
                    str(check["questions"]),
                    f"{check['same_as_one_at_a_time']}/{check['questions']}",
                    f"{check[f'same_as_{other}']}/{check['questions']}",
                    percent(check[f"accuracy_{r['precision']}"]),
                    percent(check[f"accuracy_{other}"]),
                ]
            ],
        ),
    ]
