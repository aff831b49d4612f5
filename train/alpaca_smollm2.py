"""The README's measured result: LLaMA-Adapter on the embedded SmolLM2-135M-Instruct, real Alpaca rows, this CPU.

    python train/alpaca_smollm2.py                      # writes train/results/alpaca_smollm2.json

Trains with `llama_adapter.train` on ../shared/data/alpaca/alpaca_small.json (2000 Stanford Alpaca rows, 100
held out), one epoch at batch 8 (about 240 steps, under an hour on a 2-core CPU), and records validation loss before (zero gates = the base model)
and after, throughput, wall time, parameter count, checkpoint size and sample answers before and after.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

from llama_adapter import AdapterConfig, LlamaAdapterModel, SamplingConfig
from llama_adapter.adapter_files import WEIGHTS_NAME
from llama_adapter.data.reading import load_rows, split_rows
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLAMA_ADAPTER_DATA") or REPO.parent / "shared" / "data") / "alpaca" / "alpaca_small.json"
SAMPLES = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/alpaca_smollm2", help="adapter output folder")
    args = parser.parse_args()

    cfg = TrainConfig(
        data=str(DATA),
        out=args.out,
        epochs=1,
        batch_size=8,
        max_len=256,
        lr=2e-3,
        warmup=0.1,
        val_fraction=0.05,
    )
    # The held-out rows the training run will validate on; their instructions make the before/after samples.
    _, val_rows = split_rows(load_rows(cfg.data), cfg.val_fraction, cfg.seed)
    sampling = SamplingConfig(max_new_tokens=80)
    model = LlamaAdapterModel.from_base(config=AdapterConfig())
    before = [model.generate(r["instruction"], r["input"], sampling) for r in val_rows.select(range(SAMPLES))]
    summary = train(cfg, model.config, model)
    after = [model.generate(r["instruction"], r["input"], sampling) for r in val_rows.select(range(SAMPLES))]

    summary["checkpoint_bytes"] = (Path(args.out) / WEIGHTS_NAME).stat().st_size
    summary["config"] = {
        k: getattr(cfg, k) for k in ("epochs", "batch_size", "max_len", "lr", "warmup", "val_fraction")
    }
    summary["samples"] = [
        {"instruction": r["instruction"], "input": r["input"], "reference": r["output"], "before": b, "after": a}
        for r, b, a in zip(val_rows, before, after)
    ]
    results = REPO / "train" / "results"
    results.mkdir(exist_ok=True)
    (results / "alpaca_smollm2.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.copyfile(Path(args.out) / "loss.png", results / "alpaca_smollm2_loss.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
