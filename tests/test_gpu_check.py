"""scripts/gpu_check.sh, the GPU check that has to work the first time in a short slot on a GPU: its dry run on the
CPU runs every step and the combiner, and the combiner (bench/gpu_check.py) records failed and timed-out steps.

The dry run's steps are the benchmark scripts on the tiny model, so their raw results are also where
bench/train_step.py's and bench/quantize.py's measured numbers are checked against one another (test_bench.py runs
the other benchmarks, and quantize.py's LLaMA-7B arithmetic, which the dry run leaves out)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from test_bench import ROWS, check_spread

sys.path.insert(0, str(REPO_ROOT / "bench"))
import gpu_check  # bench/gpu_check.py: reads files with the standard library alone


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple:
    """The dry run's results folder and its combined results."""
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    out = tmp_path / "results"
    script = REPO_ROOT / "scripts" / "gpu_check.sh"
    command = ["bash", str(script), "--dry-run", "--out-dir", str(out), "--data", str(tmp_path / "rows.json")]
    env = os.environ | {"TMPDIR": str(tmp_path)}  # the steps' scratch folder too, so nothing is left behind
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Results: {out / 'gpu_dryrun_cpu.json'}" in done.stdout
    return out, json.loads((out / "gpu_dryrun_cpu.json").read_text())


@pytest.mark.slow
def test_the_dry_run_reports_every_number_of_the_gpu_check(dry_run):
    out, results = dry_run
    assert results["dry_run"] and results["model"] == "tiny" and results["precision"] == "fp32"
    failed = {name: step for name, step in results["steps"].items() if step["status"] != "ok"}
    assert list(results["steps"]) == list(gpu_check.STEPS) and not failed, failed
    tests = results["tests"]
    assert tests["failed"] == tests["errors"] == 0 and tests["passed"] >= 20, tests

    head = results["headline"]
    step = head["train_step"]
    assert list(step["methods"]) == ["floor", "ours", "peft", "compiled"]
    for name, numbers in step["methods"].items():
        assert numbers["tokens_per_s"] > 0
        # On a CPU each peak comes from a fresh process, where the compiled layers would compile again: not measured.
        assert numbers["peak_memory_mib"] is None if name == "compiled" else numbers["peak_memory_mib"] > 0
        assert numbers["mfu"] is None  # a CPU has no peak FLOP/s; a GPU run gives a share
    assert step["ours_over_floor"] > 0 and step["peft_over_ours"] > 0 and step["compiled_over_ours"] > 0
    assert step["compiled_first_loss_difference"] < 1e-5
    assert any(op.startswith("aten::") for op in results["raw"]["train_step"]["profile_top_ops_ms"]["ours"])
    batchings = head["finetune"]["batchings"]
    assert list(batchings) == ["grouped", "packed"]
    for numbers in batchings.values():
        assert numbers["tokens_per_s"] > 0 and numbers["alpaca52k_x5_projected_minutes"] > 0
    projected = head["alpaca52k_x5"]
    assert projected["projected_minutes"] == min(b["alpaca52k_x5_projected_minutes"] for b in batchings.values())
    assert list(head["generation"]) == ["1", "8"]
    for speeds in head["generation"].values():
        assert min(speeds["base"], speeds["ours"], speeds["peft"]) > 0 and speeds["ours_over_base"] > 0
    assert list(head["quantize"]) == ["none", "int8", "nf4"]
    assert all(setting["peak_mib"] > 0 for setting in head["quantize"].values())

    goal = results["goal"]
    assert goal["minutes"] == 30 and not goal["applies"]  # the tiny model's numbers say nothing of LLaMA-7B's goal
    assert goal["measured"] == projected and goal["met"] == (projected["projected_minutes"] <= 30)
    if not goal["met"]:
        assert goal["missed_by"]["minutes"] == pytest.approx(projected["projected_minutes"] - 30)
        assert goal["profile_top_ops_ms"] == results["raw"]["train_step"]["profile_top_ops_ms"]["ours"]
    summary = (out / "gpu_dryrun_cpu.md").read_text()
    assert goal["statement"] in summary and "| `pytest -m cuda` | " in summary
    assert "| Alpaca-52K × 5 epochs, projected |" in summary


def raw_results(results: dict, script: str) -> dict:
    raw = results["raw"][script]
    assert raw["command"].startswith(f"python bench/{script}.py --model tiny")
    assert raw["device"].startswith("CPU") and raw["precision"] == "fp32"
    return raw


@pytest.mark.slow
def test_the_train_step_benchmark_numbers_agree(dry_run):
    results = raw_results(dry_run[1], "train_step")  # --batch-size 2 --seq-len 16 --profile --compile
    methods = results["methods"]
    assert set(methods) == {"floor", "ours", "peft", "compiled"}
    for name, method in methods.items():
        check_spread(method)
        assert method["tokens_per_s"] == pytest.approx(2 * 16 / method["median_s"], rel=0.01)
        assert method["saved_activations_mib"] > 0
        if name != "compiled":  # a fresh process would compile again: not measured on a CPU
            assert 0 < method["peak_memory_mib"]["min"] <= method["peak_memory_mib"]["max"]
    assert results["compiled_over_ours"] == pytest.approx(methods["compiled"]["median_s"] / methods["ours"]["median_s"])
    assert results["compiled_first_loss_difference"] < 1e-5  # the compiled layers compute the same loss
    assert results["ours_over_floor"] == pytest.approx(methods["ours"]["median_s"] / methods["floor"]["median_s"], 0.01)
    assert results["peft_over_ours"] == pytest.approx(methods["peft"]["median_s"] / methods["ours"]["median_s"], 0.01)
    assert results["targets"]["ours_over_floor <= 1.10"] == (results["ours_over_floor"] <= 1.10)
    assert any(op.startswith("aten::") for op in results["profile_top_ops_ms"]["ours"])
    if not results["targets"]["peft_over_ours >= 1.4"]:  # always, so far: the why comes from the run's profile
        assert "matrix products" in results["missed"]["peft_over_ours >= 1.4"]["why"]


@pytest.mark.slow
def test_the_quantize_benchmark_measures_each_setting(dry_run):
    results = raw_results(dry_run[1], "quantize")  # --no-llama-7b-arithmetic: test_bench.py checks that part
    rows = {row["quantize"]: row for row in results["measured"]}
    assert list(rows) == ["none", "int8", "nf4"]
    for setting, row in rows.items():
        assert row["weights_mib"] > 0 and row["peak_mib"] > row["weights_mib"]
        assert row["train_tokens_per_s"] > 0 and row["generation_tokens_per_s"] > 0
        assert len(row["alpaca_val_loss"]) == 2
        if setting != "none":
            assert row["weights_mib_vs_none"] == pytest.approx(row["weights_mib"] / rows["none"]["weights_mib"], 1e-2)
    # The tiny model is mostly its embedding, which stays full precision; LLaMA-7B is mostly linear weights.
    assert rows["nf4"]["weights_mib"] < rows["int8"]["weights_mib"] < rows["none"]["weights_mib"]
    assert results["llama_7b"] is None and "| nf4 |" in results["tables"]["measured"]


def write_step(scratch, name, rc, seconds=2.0, limit=60, stderr=""):
    (scratch / f"{name}.command").write_text(f"python {name}\n")
    (scratch / f"{name}.status").write_text(f"rc={rc}\nlimit_s={limit}\nstart=100.0\nend={100.0 + seconds}\n")
    (scratch / f"{name}.err").write_text(stderr)
    (scratch / f"{name}.out").write_text(f"{name} said this on stdout\n")


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="4"><testcase classname="tests.test_cuda" name="test_a"/><testcase classname="tests.test_cuda"
name="test_b"><failure message="AssertionError: not equal">trace</failure></testcase><testcase
classname="tests.test_cuda" name="test_c"/><testcase classname="tests.test_cuda" name="test_d"><skipped
message="no kernel"/></testcase></testsuite></testsuites>"""


def test_failed_timed_out_and_missing_steps_are_recorded_and_the_rest_kept(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    write_step(scratch, "pytest", 1)
    (scratch / "pytest.xml").write_text(JUNIT)
    write_step(scratch, "train_step", 124, seconds=75.0, limit=75, stderr="loading...\nstill loading")
    write_step(scratch, "finetune", 1, stderr="Traceback ...\nCUDA error: out of memory")
    write_step(scratch, "generation", 0)
    speeds = {"median_s": 1.0, "tokens_per_s": 8.0}
    batch = {"base": speeds, "ours": speeds, "peft": speeds, "ours_over_base": 1.0, "ours_over_peft": 1.0}
    (scratch / "generation.json").write_text(json.dumps({"torch": "2.11", "batches": {"1": batch}}))
    (scratch / "quantize.status").write_text("rc=skipped\nlimit_s=4\n")  # the budget ran out before it

    results = gpu_check.combine(scratch, "NVIDIA H200", "llama-7b", dry_run=False, wall_s=200)
    steps = results["steps"]
    assert {name: step["status"] for name, step in steps.items()} == {
        "pytest": "failed",
        "train_step": "timed out",
        "finetune": "failed",
        "generation": "ok",
        "quantize": "skipped",
    }
    assert steps["train_step"]["stderr_tail"].endswith("still loading") and steps["train_step"]["rc"] == 124
    assert "out of memory" in steps["finetune"]["stderr_tail"] and "stderr_tail" not in steps["generation"]
    assert "said this on stdout" in steps["pytest"]["stdout_tail"]  # pytest reports its failures there
    assert results["tests"] == {
        "passed": 2,
        "failed": 1,
        "errors": 0,
        "skipped": 1,
        "failures": {"tests.test_cuda::test_b": "AssertionError: not equal"},
    }
    assert list(results["headline"]) == ["generation"]  # what there is, kept
    assert results["goal"]["met"] is None and "finetune" in results["goal"]["why"]
    summary = gpu_check.markdown(results)
    assert "| train_step | timed out | 75.0 | 75 |" in summary and "CUDA error: out of memory" in summary
    assert "| generation, batch 1, base / ours / PEFT: tokens/s | 8.0 / 8.0 / 8.0 |" in summary
    assert gpu_check.slug("NVIDIA H200") == "nvidia_h200" and gpu_check.slug("NVIDIA H100 80GB HBM3") == (
        "nvidia_h100_80gb_hbm3"
    )
