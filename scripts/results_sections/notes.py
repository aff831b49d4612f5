"""Notes that hold only for the committed run of a results file: the commit it ran at, how it was pinned to a core,
what else shared the machine.

Keyed by the file's path and then by the first 12 hex digits of its SHA-256, so that a re-run, which writes a new file,
drops its stale note instead of describing a run that is no longer the one on the page.
"""

RUN_NOTES = {
    "eval/results/scienceqa_sweep.json": {
        "3840c959c08a": (
            "The first five recipes ran at commits `a3e298d` to `628a560` (later commits add recipes, the text "
            "form and columns; none changes what an earlier recipe computes) and were re-scored from their "
            "predictions files at `9430e3d`, where lora+captions+text+3-epochs ran alone. The extra, "
            "explanation-after, V2, series and parallel recipes ran at `7696b27`, in that order, alone but for "
            "tests during the extra run's first ten minutes; the base scored by text, v2+captions+text+3-epochs "
            "and the test stage ran at `59c4482`, alone. Train times are wall times on the shared 2-core machine: "
            "lora+captions, v1+captions+text and part of v1+captions ran beside other work (a one-thread trial of "
            "the text form, tests), at 190 to 230 training tokens/s against about 280 alone; explanation-after's "
            "130 steps hold two and a half times the tokens (the lecture and solution), so they took 35 minutes. "
            "A first v1+captions+extra run drew from all 8,327 ARC and OpenBookQA rows; it was stopped after "
            "about 50 steps when the recipe changed to a sample as large as the ScienceQA train split, and it is "
            "not in the table. Summaries written before `6d5d0f5` held NaN for the validation loss of runs with "
            "nothing held out; the file now holds null there. The explanation-before recipe trained and generated "
            "its 371 validation answers at `612d9b9` (31 minutes of training, 33 of generating, beside a few "
            "short test runs); its answers were then re-read, unchanged, at `0208874`, whose parser also takes an "
            "answer that names one option by its opening: 13 of the 371 changed, 143 right answers became 149, "
            "and 62 answers still name no option."
        ),
    },
    "bench/results/v2.json": {
        "0a5ba3571eca": "The first four commands ran in that order while commits `89a1d3e` to `e1d7a46` were made, none of "
        "which changes what they compute; the second was stopped during the shapes, whose scoring then changed from likelihood to "
        "greedy answers, and its shapes cells were measured again by the third. Tests ran beside the first two "
        "Alpaca runs at times, so their training-run tokens/s in the file are low; the table's tokens/s come from "
        "the fourth command's interleaved steps, with nothing else running. What the rows show: on Alpaca and math "
        "V2 at lr 1e-3 ends lower than v1 at its paper rate (1.874 against 1.967, 0.548 against 0.666), its "
        "biases, scales and norms adding capacity in every layer. At v1's rate, 9e-3, V2 ends above the untrained "
        "base on Alpaca (2.123 against 2.057): those parameters act on every activation of every layer, and the "
        "rate that suits zero-gated prompts overshoots them; about 1e-3 suits V2 here. On the shapes V2 does not "
        "beat v1 (37.0 against 93.0), and early fusion is why: with the image in the first adapted layer's "
        "prompts alone (V=1), neither rate learns the colour in 60 steps (37.0 at 1e-3, 38.0 at 9e-3; chance "
        "33.3), while the same V2 with the image in all 30 layers' prompts, as v1 has it (V=30), reaches 67.5 at "
        "1e-3. The encoder is random, so its features hold the colour but nothing one layer's prompts turn into an "
        "answer this fast; the paper's early fusion was made for a pretrained CLIP and joint training on captions, "
        "which this run has neither of. On ScienceQA no row beats the untrained base (42.66) or chance (about 40%): "
        "on 361 problems differences under about 5 points are noise, and at this budget the 135M model does not "
        "learn the task (issue 25 is about that). The fifth command, at `a1562f2`, measured the base's shapes "
        'cell again, alone: its greedy answers read "The correct answer is (B) red." and the like, which the parser '
        "of the first four runs did not take (0.0); read now, the base always picks B, 33.0, chance. The trained "
        "rows answer in the trained form, which both parsers read alike.",
    },
    "train/results/shelf_alpaca.json": {
        "04afef2df961": "The first stage ran beside the shapes script and tests at times, on one thread for a while, so "
        "its wall time is longer than it would take alone on the 2 cores; it was stopped and resumed from its "
        "checkpoints at steps 300, 325, 350 and 600, on 1 or 2 threads, so its last digits may differ from an "
        "unbroken run on 2. The second stage ran alone, unbroken, at commit `2cced3d` plus `--eos-weight`.",
    },
    "train/results/shelf_shapes.json": {
        "3712e06cf161": "The `shapes` adapter was trained at commit `1adfd1e`. Both accuracy cells were measured "
        "again, without training, by `python train/shelf_shapes.py --score-only` at `753bcec` with issue 37's parser: "
        'the untrained base answers every image "The correct answer is (B) ...", which `scienceqa.parse_answer` '
        "used to read as no answer, so the first run put it at 0.0%. The same 200 answers read with the old parser "
        "give 0/200 again; the trained adapter's give 200/200 with either.",
    },
    "bench/results/methods.json": {
        "568c5bb278fe": "Run at commit `dadcadd` as `OMP_NUM_THREADS=1 taskset -c 0 <command>`, on one core of the "
        "2-core dev CPU with nothing else on it. Two flags were renamed since: `--math-limit` is `--limit`, "
        "`--math-batch-size` is `--eval-batch-size`.",
    },
    "bench/results/methods_more.json": {
        "92fcb1335c04": "Run at commit `bf16a8d` as `OMP_NUM_THREADS=1 taskset -c 0 <command>` while the other core "
        "ran the commonsense table below (both pinned); its `--out` was a scratch folder and the file was then "
        "committed as `bench/results/methods_more.json`.",
    },
    "bench/results/methods_commonsense.json": {
        "7f21d92fb2fc": "Run at commit `bf16a8d` as `OMP_NUM_THREADS=1 taskset -c 1 <command>`, on the other core, "
        "beside the math run above.",
    },
    "bench/results/methods_adalora.json": {
        "52c25c1da78d": "Run at commit `4a47c5f`.",
    },
    "bench/results/methods_commonsense_adalora.json": {
        "383e5acff544": "Run at commit `4a47c5f`.",
    },
    "bench/results/finetune.json": {
        "c4eea6c8aa40": "Where the packed step's time goes, from torch.profiler on one step of each batching over the same "
        "40 random rows (1,970 tokens; nine packs, four of them profiled against the same rows length-grouped): "
        "SDPA forward and backward took 1.93 s packed against 1.33 s grouped, `aten::fill_` 0.54 s against 0.2 s "
        "(the 512-wide masks), while the matrix products took 5.56 s against 6.39 s: larger matrices gain a little, "
        "attention over 512-position sequences with a block-diagonal mask costs more.",
    },
    "bench/results/train_step.json": {
        "b85b6f335a28": "Measured again at commit ff0a838 (issue 38: each call carries its adapter; the package laid out by "
        "concept), to check that neither made a step slower: ours 1.040x the floor and PEFT 1.190x ours, where the "
        "run before it (commit 912e663, on a more loaded machine: every step about 3x slower) gave 1.038x and 1.175x.",
    },
    "bench/results/generation.json": {
        "71f923ca21ca": "Measured again at commit ff0a838 (issue 38: each call carries its adapter; the package laid out by "
        "concept): ours 0.99x the base's tokens/s at batch 1 and 0.98x at batch 8, where the run before it (commit "
        "912e663, on a more loaded machine: about 1.6x and 2.7x slower in absolute terms) gave 0.96x and 1.01x.",
    },
    "bench/results/serve.json": {
        "15168f272070": "Measured at the commit after 633634b (issue 39: rows of different adapters in one batch; "
        "log-probabilities), alone on the machine, the same 1,122 completion tokens as every run before it. The "
        "library phase, the run's first, gave 12.2 tokens/s where the run at ff0a838 gave 16.2: the same "
        "`answer_batch` on the same 8 prompts measured 16.7 tokens/s at both 36b437b and this commit, one after "
        "the other, so the 1.21x of one client over the library is that phase's noise, not a faster server.",
    },
}
