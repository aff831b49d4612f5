"""The GPU check (`scripts/gpu_check.sh`): what it measures, and the summaries of its runs, quoted as they were
written, since a GPU slot is rare and its summary is the only record of it."""

from .formatting import bullets, para
from .sources import REPO


def on_a_gpu() -> list[str]:
    checks = sorted((REPO / "bench/results").glob("gpu_*.md"))
    lines = [
        "### On a GPU: `bash scripts/gpu_check.sh`",
        "",
        *para(
            "One prepared command checks and measures the whole CUDA path in at most 8 minutes on one H100 or H200,",
            "and leaves `bench/results/gpu_<device>.json` and a markdown summary beside it:",
        ),
        *bullets(
            "`pytest -m cuda` (`tests/test_cuda.py`): zero gates exact in fp32 and bf16, eager equal to SDPA and"
            " to each of its math, efficient and flash kernels with trained gates, cached equal to uncached greedy"
            " generation, PEFT parity, multimodal, nf4 and int8 training steps that reach the adapter, an exact"
            " resume, packed rows equal to padded ones;",
            "on LLaMA-7B's shape with random bf16 weights made on the GPU: the training step (floor / ours / PEFT /"
            " ours with `torch.compile`d layers) with tokens/s, MFU, peak memory and the profile's top operators;"
            " packed against length-grouped fine-tuning on the Alpaca sample; generation at batch 1 and 8 against"
            " the base; the peak memory of training on an int8 and an nf4 base; and the projected Alpaca-52K × 5"
            " epochs, against the goal of 30 minutes (about 16,000 tokens/s, 45% MFU).",
        ),
        *para(
            "Each step runs under a time limit; one that fails or runs out of time is recorded with the end of its",
            "stderr, and the others still run. `bash scripts/gpu_check.sh --dry-run` runs the same steps on a tiny",
            "model on the CPU in about a minute, and `tests/test_gpu_check.py` runs it, so the script cannot rot",
            "between GPU slots.",
        ),
    ]
    if not checks:
        return lines + para("No GPU has run it yet: its numbers are still to come.")
    for check in checks:
        lines += para(f"Its latest run, `{check.relative_to(REPO)}`:")
        lines += ["> " + line if line else ">" for line in check.read_text().strip().splitlines()] + [""]
    return lines
