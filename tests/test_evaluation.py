"""Multiple-choice evaluation on a tiny random LLaMA: batched generation, likelihood choice, resume, the CLI."""

import dataclasses
import json

import pytest
import torch
from conftest import write_image
from PIL import Image
from test_scienceqa import sqa_dir  # noqa: F401 - the ScienceQA fixture folder

from llama_adapter import AdapterConfig, LlamaAdapterModel, cli
from llama_adapter.config import SamplingConfig, VisualConfig
from llama_adapter.data import batching, encoding, templates
from llama_adapter.data.synthetic import COLOURS, make_colour_problems
from llama_adapter.evaluation import scienceqa
from llama_adapter.evaluation.predict import evaluate_problems
from llama_adapter.evaluation.predictions import read_predictions
from llama_adapter.serving.generation import generate_batch
from llama_adapter.serving.logprobs import options_logprobs


def test_batched_generation_equals_one_prompt_at_a_time(make_model, randomize_adapter):
    model = make_model(adapter_len=4, adapter_layers=3)
    randomize_adapter(model, seed=5)
    prompts = [
        templates.format_prompt("Count to three."),
        templates.format_prompt("Hi.", "a much longer input, padded less"),
    ]
    sampling = SamplingConfig(max_new_tokens=10)
    together = generate_batch(model, prompts, sampling)
    alone = [generate_batch(model, [prompt], sampling)[0] for prompt in prompts]
    assert together == alone
    assert together[0] == model.generate("Count to three.", sampling=sampling)


def test_response_logprobs_sum_the_response_tokens(make_model, tokenizer, randomize_adapter):
    model = make_model(adapter_len=4, adapter_layers=3)
    randomize_adapter(model)
    rows = [{"instruction": "Pick.", "input": "", "output": out} for out in ("The answer is A.", "No, B")]
    batch = batching.collate([encoding.encode(tokenizer, row, 256) for row in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        actual = model.response_logprobs(**batch)
        logprobs = model(batch["input_ids"], batch["attention_mask"]).log_softmax(-1)
    for row in range(2):
        labels = batch["labels"][row]
        positions = (labels[1:] != -100).nonzero()[:, 0]
        expected = logprobs[row, positions, labels[1:][positions]].sum()
        torch.testing.assert_close(actual[row], expected, atol=1e-4, rtol=1e-5)


def test_likelihood_scoring_picks_the_most_likely_option(make_model, randomize_adapter, sqa_dir, tmp_path):  # noqa: F811
    model = make_model(adapter_len=4, adapter_layers=3)
    randomize_adapter(model)
    problems, _ = scienceqa.load_problems(sqa_dir, "test", missing_images="text-only")
    scores = evaluate_problems(model, problems, tmp_path / "p.jsonl", scoring="likelihood", batch_size=4)
    records = read_predictions(tmp_path / "p.jsonl")
    assert scores["unparsed"] == 0 and scores["scoring"] == "likelihood"
    problem = problems[0]
    instruction, input = scienceqa.question_prompt(problem)
    candidates = [scienceqa.answer_text(dataclasses.replace(problem, answer=i)) for i in range(len(problem.choices))]
    examples = [
        encoding.encode(model.tokenizer, {"instruction": instruction, "input": input, "output": c}, 10_000)
        for c in candidates
    ]
    with torch.no_grad():
        alone = [
            model.response_logprobs(**batching.collate([e], model.tokenizer.pad_token_id)).item() for e in examples
        ]
    assert records[problem.pid]["pred"] == max(range(len(alone)), key=alone.__getitem__)


def test_evaluation_resumes_and_scores_every_problem_once(make_model, sqa_dir, tmp_path, monkeypatch):  # noqa: F811
    model = make_model()
    problems, _ = scienceqa.load_problems(sqa_dir, "test", missing_images="text-only")
    out = tmp_path / "preds.jsonl"
    evaluate_problems(model, problems[:2], out, max_new_tokens=4)
    with open(out, "a") as handle:
        handle.write('{"pid": "torn')  # a crash mid-line
    asked = []
    monkeypatch.setattr(
        "llama_adapter.evaluation.predict.generate_batch",
        lambda m, prompts, *a, **k: asked.extend(prompts) or ["B"] * len(prompts),
    )
    scores = evaluate_problems(model, problems, out, max_new_tokens=4)
    assert len(asked) == len(problems) - 2  # only the problems not predicted before
    assert scores["count"]["Avg"] == len(problems)
    assert len(read_predictions(out)) == len(problems)


def test_a_lora_adapters_predictions_resume(make_base, tokenizer, sqa_dir, tmp_path):  # noqa: F811
    """Its config holds a tuple (the target modules), which the settings file gives back as a list."""
    model = LlamaAdapterModel(make_base(), tokenizer, AdapterConfig(method="lora"))
    problems, _ = scienceqa.load_problems(sqa_dir, "test", missing_images="text-only")
    out = tmp_path / "preds.jsonl"
    evaluate_problems(model, problems[:2], out, scoring="likelihood")
    scores = evaluate_problems(model, problems, out, scoring="likelihood")
    assert scores["count"]["Avg"] == len(problems)


def test_the_library_refuses_to_mix_scoring_modes_in_one_predictions_file(make_model, sqa_dir, tmp_path):  # noqa: F811
    """The settings check is in the loop every evaluation uses, not only in the command (R7)."""
    model = make_model()
    problems, _ = scienceqa.load_problems(sqa_dir, "test", missing_images="text-only")
    out = tmp_path / "p.jsonl"
    evaluate_problems(model, problems[:1], out, scoring="generate", max_new_tokens=2)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        evaluate_problems(model, problems, out, scoring="likelihood")
    assert out.read_bytes() == before


def test_multimodal_evaluation_gives_each_row_its_own_image(make_model, tiny_clip, tmp_path, monkeypatch):
    model = make_model(visual=VisualConfig(clip_model=tiny_clip))
    problems = make_colour_problems(tmp_path / "img", 3, seed=0)
    problems[1] = dataclasses.replace(problems[1], image=None)  # its file went missing: evaluated text-only
    seen = {}

    def spy(m, prompts, sampling, image_features=None, has_image=None, on_row_done=None):
        seen.update(features=image_features, has_image=has_image)
        return ["A"] * len(prompts)

    monkeypatch.setattr("llama_adapter.evaluation.predict.generate_batch", spy)
    evaluate_problems(model, problems, tmp_path / "p.jsonl")
    assert seen["has_image"].tolist() == [True, False, True]
    torch.testing.assert_close(seen["features"][2], model.encode_images([problems[2].image])[0])
    assert torch.equal(seen["features"][1], torch.zeros_like(seen["features"][1]))


def test_colour_problems_are_reproducible_and_answerable_only_from_the_image(tmp_path):
    first = make_colour_problems(tmp_path / "a", 30, seed=3)
    again = make_colour_problems(tmp_path / "b", 30, seed=3)
    assert [p.answer for p in first] == [p.answer for p in again]
    assert {p.question for p in first} == {"What colour is the shape?"}
    for problem in first[:5]:
        pixels = {colour for _, colour in Image.open(problem.image).getcolors()}
        assert COLOURS[problem.choices[problem.answer]] in pixels
    assert len({p.choices for p in first}) > 1  # option order varies, so the letter alone says nothing
    fixed = make_colour_problems(tmp_path / "c", 10, seed=3, shuffle_choices=False)
    assert {p.choices for p in fixed} == {tuple(COLOURS)}


def test_cli_eval_prints_and_saves_the_table(tmp_path, sqa_dir, make_base, tokenizer, capsys):  # noqa: F811
    base_dir = tmp_path / "base"
    make_base().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    out = tmp_path / "eval" / "preds.jsonl"
    flags = ["--scoring", "likelihood", "--missing-images", "text-only"]
    cli.main(["eval", "scienceqa", "--data", str(sqa_dir), "--out", str(out), "--base", str(base_dir), *flags])
    printed = capsys.readouterr().out
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in printed
    saved = json.loads(out.with_suffix(".scores.json").read_text())
    assert saved["count"]["Avg"] == 6 and saved["settings"]["scoring"] == "likelihood"
    with pytest.raises(SystemExit, match="other settings"):
        cli.main(["eval", "scienceqa", "--data", str(sqa_dir), "--out", str(out), "--base", str(base_dir), *flags[2:]])


@pytest.mark.parametrize("method", ["llama-adapter", "llama-adapter-v2"])
def test_cli_trains_on_scienceqa_then_evaluates(tmp_path, sqa_dir, make_base, tokenizer, capsys, method):  # noqa: F811
    base_dir = tmp_path / "base"
    make_base().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    adapter = tmp_path / "adapter"
    flags = ["--max-steps", "1", "--batch-size", "1", "--val-fraction", "0", "--adapter-layers", "2", "--lr", "0.01"]
    flags += ["--method", method]
    # The train split's only problem names an image; a text-only adapter needs no image files at all.
    cli.main(
        ["train", "--task", "scienceqa", "--data", str(sqa_dir), "--base", str(base_dir), "--out", str(adapter), *flags]
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["train_tokens"] > 0
    out = tmp_path / "preds.jsonl"
    cli.main(["eval", "scienceqa", "--data", str(sqa_dir), "--adapter", str(adapter), "--out", str(out),
              "--missing-images", "text-only", "--max-new-tokens", "3"])  # fmt: skip
    assert "scoring: generate" in capsys.readouterr().out
    assert len(read_predictions(out)) == 6


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_options_after_their_prompts_score_as_whole_rows(
    make_model, tokenizer, randomize_adapter, tiny_clip, tmp_path, impl, with_image
):
    model = make_model(impl, adapter_len=4, adapter_layers=3, visual=VisualConfig(clip_model=tiny_clip))
    randomize_adapter(model, seed=7)
    with torch.no_grad():
        model.visual_proj.linear.weight.normal_()  # make the image matter
    images = [write_image(tmp_path / f"{colour}.png", colour) for colour in ("red", "blue", "green")]
    features = model.encode_images(images) if with_image else None
    asked = [("Which one?", "Some context."), ("Which of these is the one we want, in the end?", ""), ("Why?", "")]
    # Unequal lengths and counts; options that begin alike, one the beginning of another.
    options = [["The answer is A.", "B", "The answer is (C), because it is."], ["No."], ["Yes.", "Yes. No.", "Yes. No"]]
    prompts = [templates.format_prompt(*question) for question in asked]
    scores = options_logprobs(
        model, prompts, options, features, torch.tensor([True, False, True]) if with_image else None
    )

    for b, (question, texts) in enumerate(zip(asked, options)):
        rows = [{"instruction": question[0], "input": question[1], "output": text} for text in texts]
        batch = batching.collate([encoding.encode(tokenizer, row, 10_000) for row in rows], tokenizer.pad_token_id)
        image = {} if features is None or b == 1 else {"image_features": features[b : b + 1].expand(len(texts), -1)}
        with torch.no_grad():
            whole = model.response_logprobs(**batch, **image)
        torch.testing.assert_close(scores[b], whole, atol=1e-4, rtol=1e-5)
