"""The command line respects its user's time: `--help` at once, progress per question, one line for a hub that cannot
be reached, one line once for a failed run of several processes, no tracebacks for a user's mistakes in the demo, and
a header over the shelf's table."""

import importlib.metadata
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import huggingface_hub
import pytest
from test_shelf import shelved  # noqa: F401 - a shelf of one tiny adapter

from llama_adapter import cli, methods
from llama_adapter.base import loading
from llama_adapter.config import VisualConfig
from llama_adapter.evaluation import predict
from llama_adapter.evaluation.scienceqa import Problem
from llama_adapter.serving import demo
from llama_adapter.train import launch
from llama_adapter.visual import ImageEncoder

HEAVY = ("torch", "transformers", "datasets", "gradio", "fastapi", "peft", "open_clip")


def test_help_and_train_help_import_none_of_the_heavy_libraries():
    script = f"""
import sys
from llama_adapter import cli
for argv in (["--help"], ["train", "--help"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
print([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "--clip-weights" in done.stdout and "--nproc" in done.stdout  # train's flags were all there
    assert done.stderr.strip().splitlines()[-1] == "[]"


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"llama-adapter {importlib.metadata.version('llama-adapter')}\n"


def test_the_method_settings_and_the_method_classes_agree(monkeypatch):
    assert {name: method.Config for name, method in methods.REGISTRY.items()} == methods.SETTINGS
    monkeypatch.setitem(methods.SETTINGS, "prompt", methods.SETTINGS["lora"])
    methods._classes.cache_clear()
    with pytest.raises(TypeError, match="disagree"):
        methods.get("lora")
    monkeypatch.undo()
    methods._classes.cache_clear()


def test_likelihood_answers_are_written_and_counted_as_each_batch_is_scored(make_model, tmp_path, monkeypatch):
    model = make_model()
    problems = [
        Problem(str(i), f"Is {i} odd?", ("yes", "no"), i % 2, "", None, False, None, None, "test") for i in range(5)
    ]
    out = tmp_path / "p.jsonl"
    written, counted = [], []  # at each batch's scoring: the records in the file; the questions on the bar
    score = predict.options_logprobs

    class Bar(predict.tqdm):
        def update(self, n=1):
            super().update(n)
            counted.append(self.n)

    def scoring(*args, **kwargs):
        written.append(len(out.read_text().splitlines()))
        return score(*args, **kwargs)

    monkeypatch.setattr(predict, "options_logprobs", scoring)
    monkeypatch.setattr(predict, "tqdm", Bar)
    predict.evaluate_problems(model, problems, out, scoring="likelihood", batch_size=2)
    assert written == [0, 2, 4] and counted == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------------------------------
# The hub, offline: one line at once, saying how to work offline


def test_a_hub_base_offline_fails_at_once_in_one_line_saying_how_to_work_offline():
    started = time.monotonic()
    with pytest.raises(SystemExit) as done:
        cli.main(["chat", "--base", "meta-llama/Llama-2-7b-hf", "hi"])  # the tests run with HF_HUB_OFFLINE=1
    assert time.monotonic() - started < 5
    message = str(done.value.code)
    assert message.startswith("llama-adapter chat: error: --base 'meta-llama/Llama-2-7b-hf': ") and "\n" not in message
    assert (
        "the hub cannot be reached; to work offline, give a model folder" in message and "HF_HUB_OFFLINE=1" in message
    )


def test_the_hub_check_is_bounded_even_when_the_name_server_never_answers(monkeypatch):
    release = threading.Event()

    class Silent:  # a request that waits for an address as a resolver that cannot be reached makes it wait
        def head(self, *args, **kwargs):
            release.wait(30)

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_session", Silent)
    monkeypatch.setattr(loading, "HUB_TIMEOUT", 0.2)
    started = time.monotonic()
    try:
        assert not loading.hub_reachable()
        assert time.monotonic() - started < 2
    finally:
        release.set()


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_pretrained_clip_weights_offline_and_not_cached_are_refused_in_one_line(empty_hub_cache):
    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as refused:
        ImageEncoder(VisualConfig(clip_model="ViT-B-32", clip_weights="openai"))
    assert time.monotonic() - started < 5
    assert str(refused.value) == (
        "--clip-weights 'openai': ViT-B-32's weights are not in the Hugging Face cache and the hub cannot be reached; "
        "download them where it can be (hf download timm/vit_base_patch32_clip_224.openai), then HF_HUB_OFFLINE=1 "
        "reads them"
    )
    with pytest.raises(ValueError, match=r"^--clip-weights 'opneai': no such file, nor pretrained weights of ViT-B-32"):
        ImageEncoder(VisualConfig(clip_model="ViT-B-32", clip_weights="opneai"))


def test_cached_clip_weights_are_not_refused_offline(empty_hub_cache, monkeypatch):
    snapshot = empty_hub_cache / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")

    class Built(Exception):
        pass

    def create(*args, **kwargs):
        raise Built

    monkeypatch.setattr("open_clip.create_model_and_transforms", create)
    with pytest.raises(Built):  # past the check, on to open_clip, which reads the cache
        ImageEncoder(VisualConfig(clip_model="ViT-B-32", clip_weights="openai"))


# ----------------------------------------------------------------------------------------------------------
# Several processes: the first failure in one line, once


def test_a_run_of_two_processes_that_fails_says_so_once_in_one_line(tiny_base_dir, rows_file, tmp_path):
    """Rank 0 finds that no row fits --max-len while rank 1 waits for it; both have built a PEFT model by then."""
    argv = ["train", "--nproc", "2", "--base", str(tiny_base_dir), "--data", str(rows_file), "--out", "run"]
    argv += ["--method", "lora", "--lora-rank", "2", "--max-len", "20"]
    done = subprocess.run(
        [sys.executable, "-m", "llama_adapter", *argv], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert done.returncode == 1
    error = f"llama-adapter train: error: {rows_file}: no training row keeps a response token within --max-len 20"
    assert [line for line in done.stderr.splitlines() if "error" in line.lower()] == [f"{error}: nothing to train on"]
    for noise in ("Traceback", "SIGTERM", "OMP_NUM_THREADS", "ChildFailedError", "FutureWarning"):
        assert noise not in done.stderr


@pytest.mark.parametrize(
    ("nproc", "cores", "gpus", "expected"),
    [
        (2, 2, 0, None),
        (3, 2, 0, ("warning", "--nproc 3 is more processes than this machine's 2 CPU core(s): they take turns")),
        (2, 16, 2, None),
        (4, 16, 2, ("error", "--nproc 4: this machine has 2 GPU(s), and each process needs one of its own")),
    ],
)
def test_more_processes_than_cores_are_warned_of_and_than_gpus_refused(nproc, cores, gpus, expected):
    said = launch.too_many(nproc, cores, gpus)
    if expected is None:
        assert said is None
    else:
        assert said[0] == expected[0] and said[1].startswith(expected[1])


# ----------------------------------------------------------------------------------------------------------
# The demo's refusals: one line in the console, no traceback; the shelf's table: a header


def test_the_demo_logs_a_users_mistake_in_one_line_and_has_gradio_print_no_traceback(make_model, caplog):
    handlers = demo._Chat({"text": make_model()})
    with caplog.at_level(logging.WARNING, logger=demo.__name__), pytest.raises(gr.Error) as refused:
        list(handlers.send({"text": "Hi.", "files": []}, [], "other", 0.0, 1.0, 4))
    assert refused.value.print_exception is False
    assert [record.getMessage() for record in caplog.records] == [
        "refused: Unknown adapter 'other'; choose one of ['text']."
    ]


def test_adapters_prints_a_header_over_aligned_columns(shelved, capsys):  # noqa: F811
    cli.main(["adapters"])
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "method", "base", "parameters", "for"]
    assert row.split()[:2] == ["tiny", "llama-adapter"]
    for column in ("method", "base"):
        assert row[header.index(column) - 1] == " " and row[header.index(column)] != " "
    parameters = f"{shelved.num_trainable_parameters():,}"
    assert row.index(parameters) + len(parameters) == header.index("parameters") + len("parameters")


# ----------------------------------------------------------------------------------------------------------
# Precision follows the hardware: bf16 to answer where the CPU has bf16 instructions; training keeps fp32 on a CPU


@pytest.mark.parametrize(
    "flags, has", [("fpu avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx2", False)]
)
def test_answering_defaults_to_bf16_where_the_cpu_has_it_and_training_to_fp32(tmp_path, monkeypatch, flags, has):
    import torch

    from llama_adapter import config
    from llama_adapter.train.config import TrainConfig

    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(config, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config.cpu_has_bf16.cache_clear()
    try:
        assert config.cpu_has_bf16() == has
        assert config.ModelConfig().precision == ("bf16" if has else "fp32")  # chat, demo, serve, eval
        assert config.BaseModelConfig().precision == TrainConfig(data="r.jsonl", out="run").model.precision == "fp32"
        assert config.ModelConfig(precision="fp32").precision == "fp32"  # --precision decides
        args = cli.build_parser("chat").parse_args(["chat", "Hi."])
        assert config.from_arguments(config.ModelConfig, args).precision == ("bf16" if has else "fp32")
    finally:
        config.cpu_has_bf16.cache_clear()  # the real machine's answer again


def test_a_cpu_whose_flags_cannot_be_read_answers_in_fp32(tmp_path, monkeypatch):
    import torch

    from llama_adapter import config

    monkeypatch.setattr(config, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config.cpu_has_bf16.cache_clear()
    try:
        assert config.ModelConfig().precision == "fp32"
    finally:
        config.cpu_has_bf16.cache_clear()
