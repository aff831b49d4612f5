"""The shelf: adapters shipped inside the package, named wherever an adapter folder is taken."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from llama_adapter import DEFAULT_BASE, adapter_files, cli, shelf
from llama_adapter.adapter_files import LEGACY_CONFIG_NAME, WEIGHTS_NAME
from llama_adapter.base import structure
from llama_adapter.config import ModelConfig, SamplingConfig, VisualConfig
from llama_adapter.data import templates
from llama_adapter.data.synthetic import make_colour_problems
from llama_adapter.evaluation import scienceqa
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.serving import generation
from llama_adapter.serving.models import load_models

REPO = Path(__file__).resolve().parents[1]
# Held out by train/shelf_alpaca.py: the base model runs on to the token limit, `alpaca` answers and stops.
HELD_OUT = "Classify the following sentence into the given categories: He worked hard to achieve his goal:"


@pytest.fixture
def shelved(make_model, randomize_adapter, tiny_base_dir, tmp_path, monkeypatch):
    """A shelf of one adapter, `tiny`, trained-looking, on the tiny base saved at tiny_base_dir."""
    folder = tmp_path / "shelf"
    model = make_model()
    model.base.name_or_path = str(tiny_base_dir)
    randomize_adapter(model)
    model.save(folder / "tiny")
    (folder / "tiny" / "README.md").write_text(
        "# tiny: a test adapter\n\nRepeats words, badly. Only for\ntests.\n\nMore.\n"
    )
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


def test_a_data_folder_named_like_a_shelf_adapter_leaves_the_demo_and_server_theirs(
    shelved, tiny_base_dir, tmp_path, monkeypatch
):
    """Started in a folder that holds data called `tiny/`, the demo and the server still offer the shelf's `tiny`."""
    from llama_adapter.serving.demo import _Chat

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "train.json").write_text("[]")
    choices = load_models(ModelConfig(base=str(tiny_base_dir), precision="fp32"), (), "base")
    assert list(choices) == ["base", "tiny"]
    assert all(torch.equal(a, b) for a, b in zip(choices["tiny"].gates().values(), shelved.gates().values()))
    summary, _, saved = _Chat(choices).describe("tiny")
    assert summary.startswith("**tiny**: llama-adapter") and saved["adapter"] == shelved.config.to_dict()


def test_an_evaluation_records_its_adapter_by_shelf_name_or_absolute_folder(
    shelved, tiny_base_dir, tmp_path, monkeypatch
):
    """A predictions file started with `--adapter runs/a` in one folder is not resumed with another folder's runs/a."""
    rows = [{"instruction": "What is 1 and 1?", "input": "", "output": "2", "answer": "2"}]
    (tmp_path / "math" / "gsm8k").mkdir(parents=True)
    (tmp_path / "math" / "gsm8k" / "test.json").write_text(json.dumps(rows))
    argv = ["eval", "math", "--data", str(tmp_path / "math"), "--datasets", "gsm8k", "--base", str(tiny_base_dir)]
    argv += ["--max-new-tokens", "1", "--adapter"]
    for folder in ("first", "second"):
        shelved.save(tmp_path / folder / "runs" / "a")  # two runs of the same settings
    monkeypatch.chdir(tmp_path / "first")
    cli.main([*argv, "runs/a", "--out", str(tmp_path / "p.jsonl")])
    monkeypatch.chdir(tmp_path / "second")
    changed = r"p.jsonl was made with other settings \{'adapter': \('.*/first/runs/a', '.*/second/runs/a'\)"
    with pytest.raises(SystemExit, match=changed):
        cli.main([*argv, "runs/a", "--out", str(tmp_path / "p.jsonl")])
    first = (tmp_path / "first" / "runs" / "a").resolve()
    cli.main([*argv, str(first), "--out", str(tmp_path / "p.jsonl")])  # the same folder, named otherwise: resumed
    cli.main([*argv, "tiny", "--out", str(tmp_path / "shelf.jsonl")])  # a shelf adapter: by its name, from anywhere
    assert json.loads((tmp_path / "shelf.settings.json").read_text())["adapter"] == "tiny"


def test_adapters_lists_the_shelf(shelved, capsys):
    cli.main(["adapters"])
    line = capsys.readouterr().out.strip().splitlines()[-1]  # under the header
    assert line.split()[:2] == ["tiny", "llama-adapter"]
    assert f"{shelved.num_trainable_parameters():,}" in line and line.endswith("Repeats words, badly.")


# ----------------------------------------------------------------------------------------------------------
# The adapters the package ships, on the real embedded SmolLM2

SHIPPED = ("alpaca", "scienceqa", "shapes")


@pytest.fixture(scope="module")
def shipped() -> dict[str, LlamaAdapterModel]:
    torch.manual_seed(0)
    alpaca = LlamaAdapterModel.load("alpaca", device="cpu")
    return {"alpaca": alpaca, "shapes": LlamaAdapterModel.load("shapes", alongside=alpaca)}


def test_the_shelf_ships_its_adapters_each_with_its_card_and_the_command_that_made_it():
    assert shelf.names() == list(SHIPPED) == shelf.for_base(DEFAULT_BASE)
    for name in SHIPPED:
        folder = shelf.FOLDER / name
        # train_config.json: how a ScienceQA adapter's targets name the option, which `eval` needs to score it.
        extra = ["train_config.json"] if name == "scienceqa" else []
        assert sorted(path.name for path in folder.iterdir()) == sorted(
            ["README.md", LEGACY_CONFIG_NAME, WEIGHTS_NAME, *extra]  # saved before our config got its own name
        )
        parameters = adapter_files.read_config(folder)["trainable_parameters"]
        assert 4 * parameters < (folder / WEIGHTS_NAME).stat().st_size < 4 * parameters + 100_000  # fp32, adapter only
        script = re.search(r"`python ((?:train|eval)/\w+\.py)", (folder / "README.md").read_text())
        assert script and (REPO / script[1]).is_file(), f"{name}'s card names no script of this repo that made it"


@pytest.mark.slow
def test_shipped_adapters_load_as_their_config_says_on_the_base_they_name(shipped):
    for name, model in shipped.items():
        saved = adapter_files.read_config(shelf.FOLDER / name)
        assert saved["base"] == structure.base_identity(model.base)
        assert saved["trainable_parameters"] == model.num_trainable_parameters()
        assert saved["adapter"] == model.config.to_dict()
        assert any(gate.abs().max() > 0.05 for gate in model.gates().values())  # trained, not zero-initialised
    assert shipped["shapes"].visual_config == VisualConfig(clip_model="ViT-B-32", clip_seed=0)
    assert not shipped["alpaca"].multimodal


@pytest.mark.slow
def test_alpaca_answers_a_held_out_instruction_and_stops(shipped):
    results = json.loads((REPO / "train" / "results" / "shelf_alpaca.json").read_text())
    assert HELD_OUT in {row["instruction"] for row in results["answers"]}  # one of the rows training never saw
    [answer] = generation.answer_batch(shipped["alpaca"], [templates.format_prompt(HELD_OUT)], SamplingConfig(256))
    assert answer.stopped and answer.text.strip()


@pytest.mark.slow
def test_shapes_answers_held_out_images_from_the_image(shipped, tmp_path):
    model = shipped["shapes"]
    problems = make_colour_problems(tmp_path, 3, seed=2, shuffle_choices=True)[:3]  # the first held-out images
    prompts = [templates.format_prompt(*scienceqa.question_prompt(problem)) for problem in problems]
    features = model.encode_images([str(problem.image) for problem in problems])
    answers = generation.generate_batch(model, prompts, SamplingConfig(24), features)
    assert [scienceqa.parse_answer(text, 3) for text in answers] == [problem.answer for problem in problems]
    assert len({problem.answer for problem in problems}) > 1  # not one letter for every image


@pytest.mark.slow
def test_scienceqa_gives_its_committed_answers_through_eval_which_reads_its_answer_form(data_dir, tmp_path):
    """The card's numbers come from these weights: `eval` on the shelf name (which must read the text answer form from
    the shelf's train_config.json) answers the first test questions as the committed predictions file says."""
    lines = (REPO / "eval" / "results" / "scienceqa_sweep_test4241.jsonl").read_text().splitlines()
    committed = {row["pid"]: row["pred_letter"] for row in map(json.loads, lines)}
    out = tmp_path / "sqa.jsonl"
    folder = data_dir / "scienceqa"
    cli.main([
        "eval", "scienceqa", "--adapter", "scienceqa", "--data", str(folder), "--llava", str(folder / "llava_test_CQM-A.json"),
        "--image-context", "captions", "--missing-images", "text-only", "--scoring", "likelihood", "--limit", "8",
        "--out", str(out),
    ])  # fmt: skip
    answered = {row["pid"]: row["pred_letter"] for row in map(json.loads, out.read_text().splitlines())}
    assert len(answered) == 8
    assert answered == {pid: committed[pid] for pid in answered}


def test_the_shapes_card_is_its_results_file_and_reads_every_untrained_answer():
    """The card is what train/shelf_shapes.py renders from its results file, and every held-out answer was read: the
    untrained base's "The correct answer is (B) red." counts by its letter, not as no answer (issue 37)."""
    spec = importlib.util.spec_from_file_location("shelf_shapes", REPO / "train" / "shelf_shapes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = json.loads(script.RESULTS.read_text())
    assert (REPO / "llama_adapter" / "shelf" / "shapes" / "README.md").read_text() == script.card(results)
    for scored in results["accuracy"].values():
        assert "none" not in scored["picked"] and sum(scored["picked"].values()) == scored["of"]
        assert scienceqa.parse_answer(scored["most_common_answer"][0], 3) is not None
