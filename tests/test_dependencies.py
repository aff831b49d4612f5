"""What a plain `pip install llama-adapter` brings is enough for every method and every tokenizer format; a
broken environment is told, in one line, what to install."""

import importlib.metadata
import importlib.util
import re

import pytest

from llama_adapter import cli, methods


def runtime_requirements() -> set[str]:
    """The distributions `pip install llama-adapter` installs, by normalised name (extras left out)."""
    required = importlib.metadata.requires("llama-adapter") or []
    return {re.split(r"[<>=!~ \[;]", line)[0].lower().replace("_", "-") for line in required if "extra ==" not in line}


def test_every_package_a_method_imports_is_a_runtime_dependency():
    needed = {package for method in methods.METHODS for package in method.requires}
    assert "peft" in needed
    assert needed <= runtime_requirements()
    assert {"sentencepiece", "protobuf"} <= runtime_requirements()  # LLaMA folders with tokenizer.model alone


@pytest.mark.parametrize("method", methods.with_capability("requires"))
def test_a_method_whose_package_is_missing_says_what_to_install(
    method, monkeypatch, tiny_base_dir, rows_file, tmp_path
):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a)
    )
    argv = ["train", "--base", str(tiny_base_dir), "--data", str(rows_file), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit:
        cli.main([*argv, "--method", method, "--max-steps", "1"])
    assert exit.value.code == f"llama-adapter train: error: --method {method} needs peft: pip install peft"
    assert not (tmp_path / "run").exists()
