"""The benchmark scripts run end to end on a two-layer random LLaMA and write the results the README quotes.
(train_step.py and quantize.py run in test_gpu_check.py's dry run, whose raw results are checked there.)

Speed is measured by the scripts, not here: these tests check that every number they report is there and
consistent with the others, so a broken benchmark is caught before anyone runs it for an hour.
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from llama_adapter.evaluation.llm_adapters import COMMONSENSE_DATASETS, COMMONSENSE_LABELS, MATH_DATASETS

pytestmark = pytest.mark.slow  # subprocesses that load SmolLM2's tokenizer
# Rows of very different lengths, so that length grouping has padding to save.
ROWS = [
    {"instruction": f"Repeat the word {word!r} {n} times.", "input": "", "output": " ".join([word] * n)}
    for n, word in enumerate(["cat", "sunny", "blue", "seven", "tree"] * 8, start=1)
]


def run_bench(script: str, tmp_path, *args) -> dict:
    out = tmp_path / f"{script}.json"
    command = [sys.executable, str(REPO_ROOT / "bench" / f"{script}.py"), "--model", "tiny", "--out", str(out), *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["command"].startswith(f"python bench/{script}.py --model tiny")
    assert results["device"].startswith("CPU") and results["precision"] == "fp32"
    return results


def check_spread(timing: dict) -> None:
    assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"]


def test_generation_benchmark(tmp_path):
    results = run_bench(
        "generation", tmp_path, "--batch-sizes", "1", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "2"
    )
    assert set(results["batches"]) == {"1", "2"}
    for batch, summary in results["batches"].items():
        for method in ("base", "ours", "peft"):
            check_spread(summary[method])
            assert summary[method]["tokens_per_s"] == pytest.approx(int(batch) * 4 / summary[method]["median_s"], 0.01)
        assert summary["ours_over_base"] == pytest.approx(
            summary["base"]["median_s"] / summary["ours"]["median_s"], 0.01
        )
    assert len(results["targets"]) == 4
    below_base = sorted(name for name, ok in results["targets"].items() if not ok and "base" in name)
    assert sorted(results.get("missed", {})) == below_base  # every missed throughput target is explained


def test_finetune_benchmark(tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS))
    results = run_bench("finetune", tmp_path, "--data", str(data))
    assert results["train_rows"] == 38  # 5% of 40 held out
    grouped, packed = results["batchings"]["grouped"], results["batchings"]["packed"]
    assert grouped["steps"] == 10 and results["recipe"]["batch_size"] == 4  # the default recipe, one epoch
    # 38 rows, 2,369 tokens: best-fit decreasing fills five sequences of at most 512 tokens, two steps of 4 and 1.
    assert results["mean_tokens_per_row"] == pytest.approx(2369 / 38)
    assert packed["steps"] == 2 and packed["train_tokens"] == grouped["train_tokens"] == 2369
    # Lengths differ a lot from row to row: length-grouped batches pad far less than random ones, and packing pads
    # only the ends of nearly full sequences.
    assert grouped["padding_share"] < results["padding_share_random_batches"] / 2
    assert packed["padding_share"] < 0.1
    for numbers in (grouped, packed):
        assert numbers["tokens_per_s"] == pytest.approx(numbers["train_tokens"] / numbers["train_time_s"])
        minutes = 52002 * 5 * results["mean_tokens_per_row"] / numbers["tokens_per_s"] / 60
        assert numbers["alpaca52k_x5_projected_minutes"] == pytest.approx(minutes)
        assert numbers["peak_memory_mib"] > 0 and numbers["val_loss_before"] > 0
    assert results["packed_over_grouped"] == pytest.approx(packed["tokens_per_s"] / grouped["tokens_per_s"])


def test_distributed_benchmark(tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS))
    args = ["--data", str(data), "--rows", "40", "--steps", "2", "--batch-size", "4", "--max-len", "400"]
    results = run_bench("distributed", tmp_path, *args)
    runs = results["runs"]
    assert list(runs) == ["one process", "two processes, DDP", "two processes, FSDP"]
    one = runs["one process"]
    for name in ("two processes, DDP", "two processes, FSDP"):
        assert runs[name]["max_abs_adapter_difference"] < 1e-5
        assert runs[name]["max_abs_step_loss_difference"] < 1e-5
        assert runs[name]["throughput_vs_one_process"] == pytest.approx(
            runs[name]["tokens_per_s"] / one["tokens_per_s"], abs=0.002
        )
    # DDP keeps a whole copy of the weights in each process; FSDP only its shard of the decoder layers (and of the
    # embeddings: most of this model, as the vocabulary projection stays whole).
    assert runs["two processes, DDP"]["weights_mib_per_process"] == one["weights_mib_per_process"]
    assert runs["two processes, FSDP"]["weights_mib_per_process"] < one["weights_mib_per_process"]


def write_llm_adapters_data(folder) -> None:
    """Two questions per test set of both tasks, and the training files of both, in LLM-Adapters' layout."""
    answers = {name: "B" if name == "AQuA" else "4" for name in MATH_DATASETS}
    answers |= {name: COMMONSENSE_LABELS[name][0] for name in COMMONSENSE_DATASETS}
    for name, answer in answers.items():
        (folder / name).mkdir(parents=True)
        rows = [
            {"instruction": f"{name} question {i}: 2 + 2?", "input": "", "output": "", "answer": answer}
            for i in range(2)
        ]
        (folder / name / "test.json").write_text(json.dumps(rows))
    (folder / "math_data.json").write_text(json.dumps(ROWS))
    for name in ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa"):
        (folder / name / "train.json").write_text(json.dumps(ROWS[:10]))


@pytest.mark.parametrize(
    ("task", "methods"),
    [
        (
            "math",
            ["llama-adapter", "lora", "adalora", "dylora", "series", "parallel", "prefix", "ptuning-v2", "prompt"],
        ),
        ("commonsense", ["lora", "prompt"]),
    ],
)
def test_methods_benchmark(tmp_path, task, methods):
    write_llm_adapters_data(tmp_path / "llm-adapters")
    (tmp_path / "alpaca.json").write_text(json.dumps(ROWS[:8]))
    args = ["--task", task, "--methods", *methods, "--data", str(tmp_path / "llm-adapters")]
    args += ["--alpaca", str(tmp_path / "alpaca.json"), "--steps", "2", "--batch-size", "4", "--limit", "2"]
    results = run_bench("methods", tmp_path, *args, "--max-new-tokens", "4", "--gen-tokens", "4")
    assert results["task"] == task and results["training_rows"] == {"math": 40, "commonsense": 40}[task]
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["base model", *methods]
    for method, row in list(rows.items())[1:]:
        assert row["trainable_parameters"] > 0, method
        assert 4 * row["trainable_parameters"] < row["checkpoint_kib"] * 1024 < 4 * row["trainable_parameters"] + 8192
        assert row["generation_vs_base"] == pytest.approx(
            row["generation_tokens_per_s"] / rows["base model"]["generation_tokens_per_s"], rel=0.01
        )
        assert row["train_tokens_per_s"] > 0 and len(row["task_val_loss"]) == 2
    sets = MATH_DATASETS if task == "math" else COMMONSENSE_DATASETS
    for row in rows.values():
        accuracy = row["accuracy"]
        assert list(accuracy) == [*sets, "Avg"]
        assert accuracy["Avg"] == pytest.approx(sum(accuracy[name] for name in sets) / len(sets), abs=0.1)
    assert results["table"].count("\n") == len(methods) + 2 and f"| {methods[-1]} |" in results["table"]


def test_the_llama_7b_memory_arithmetic_of_the_quantize_benchmark():
    pytest.importorskip("bitsandbytes", reason="--quantize needs bitsandbytes (pip install 'llama-adapter[quantize]')")
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import quantize  # bench/quantize.py: its measured rows are checked on test_gpu_check.py's dry run

    memory = quantize.llama_7b_memory(seq_len=16)
    gib = {setting: mib / 1024 for setting, mib in memory["weights_mib"].items()}
    # bf16: 2 bytes a weight; int8 about 1 (and a scale per row); nf4 about 0.5; embeddings stay bf16 (0.49 GiB)
    assert 12.4 < gib["none"] < 12.7 and 6.3 < gib["int8"] < 6.8 and 3.4 < gib["nf4"] < 3.9, gib
    assert memory["adapter_parameters"] == 1_229_760  # the paper's 1.2M
    activations = memory["activations_mib"]
    assert activations[8]["plain"] == pytest.approx(8 * activations[1]["plain"], rel=1e-2)
    assert activations[1]["checkpointing"] < activations[1]["plain"]
    assert "| nf4 |" in quantize.format_7b(memory)
