"""The shelf: adapters shipped inside the package, named wherever an adapter folder is taken."""

import pytest

from llama_adapter import cli, shelf
from llama_adapter.model import LlamaAdapterModel


@pytest.fixture
def shelved(make_model, randomize_adapter, tiny_base_dir, tmp_path, monkeypatch):
    """A shelf of one adapter, `tiny`, trained-looking, on the tiny base saved at tiny_base_dir."""
    folder = tmp_path / "shelf"
    model = make_model()
    model.base.name_or_path = str(tiny_base_dir)
    randomize_adapter(model)
    model.save(folder / "tiny")
    (folder / "tiny" / "README.md").write_text("# tiny: a test adapter\n\nRepeats words, badly.\n")
    monkeypatch.setattr(shelf, "FOLDER", folder)
    return model


def test_a_shelf_name_loads_the_shelf_adapter(shelved, tokenizer):
    loaded = LlamaAdapterModel.load("tiny")
    ids = tokenizer("Say hi.", return_tensors="pt")["input_ids"]
    assert loaded.num_trainable_parameters() == shelved.num_trainable_parameters()
    assert (loaded(ids) - shelved(ids)).abs().max() < 1e-5


def test_a_local_folder_of_the_same_name_wins_and_says_so(shelved, make_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    local = make_model()  # zero gates: another adapter than the shelf's
    local.base.name_or_path = shelved.base.name_or_path
    local.save(tmp_path / "tiny")
    assert shelf.resolve("tiny").resolve() == (tmp_path / "tiny").resolve()
    assert "using the folder ./tiny, not the shelf's adapter" in capsys.readouterr().err
    assert all((gate == 0).all() for gate in LlamaAdapterModel.load("tiny").gates().values())


def test_an_unknown_name_lists_the_shelf(shelved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"'nothing': no such folder, and no adapter of that name on the shelf \(tiny;"
    ):
        shelf.resolve("nothing")
    assert shelf.resolve("runs/nothing").as_posix() == "runs/nothing"  # a path is left for the folder's own checks


def test_adapters_lists_the_shelf(shelved, capsys):
    cli.main(["adapters"])
    line = capsys.readouterr().out.strip()
    assert line.split()[:2] == ["tiny", "llama-adapter"]
    assert f"{shelved.num_trainable_parameters():,}" in line and line.endswith("Repeats words, badly.")
