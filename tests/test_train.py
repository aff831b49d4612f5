"""Fine-tuning on a tiny model: the loop learns, writes its outputs, and the CLI drives it end to end."""

import csv
import json
import math
import string

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from llama_adapter import AdapterConfig, cli
from llama_adapter.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from llama_adapter.config import PRECISIONS, default_precision
from llama_adapter.data import batching, encoding, reading, sources, templates
from llama_adapter.data.templates import format_conversation
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.serving.generation import stream
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import evaluate, train
from llama_adapter.train.optim import warmup_cosine


def test_paper_defaults_scale_lr_with_the_batch(rows_file, tmp_path):
    cfg = TrainConfig(data=str(rows_file), out=str(tmp_path))
    assert (cfg.epochs, cfg.max_length(2048), cfg.weight_decay, cfg.model.precision) == (5, 512, 0.02, "fp32")
    assert cfg.learning_rate("llama-adapter") == pytest.approx(9e-3 * 4 / 256)
    scaled = TrainConfig(data="x", out="y", batch_size=8, grad_accum=4)
    assert scaled.learning_rate("llama-adapter") == pytest.approx(9e-3 * 32 / 256)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(data="x", out="y", batch_size=0)


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(total_steps=100, warmup=0.2)
    assert factor(0) < factor(10) < factor(19) <= 1
    assert factor(20) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0, abs=1e-12)


def test_training_lowers_the_loss_and_writes_outputs(make_model, tokenizer, rows_file, tmp_path):
    model = make_model(adapter_len=4, adapter_layers=4)
    examples, _ = encoding.encode_all(tokenizer, reading.load_rows(rows_file), max_len=512)
    before = evaluate(model, examples, batch_size=4, pad_id=tokenizer.pad_token_id)
    out = tmp_path / "run"
    cfg = TrainConfig(
        data=str(rows_file), out=str(out), epochs=6, batch_size=4, grad_accum=2, lr=0.2, val_fraction=0.25, warmup=0.1
    )
    summary = train(cfg, model.config, model)
    after = evaluate(model, examples, batch_size=4, pad_id=tokenizer.pad_token_id)

    assert after < before - 0.1
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert summary["steps"] == 6 * math.ceil(12 / 8)
    assert summary["trainable_parameters"] == 4 * (4 * 64 + 4)
    assert {p.name for p in out.iterdir()} >= {
        WEIGHTS_NAME,
        CONFIG_NAME,
        "metrics.csv",
        "loss.png",
        "train_config.json",
    }
    settings = json.loads((out / "train_config.json").read_text())  # what eval/scienceqa_smollm2.py reads back
    assert (settings["epochs"], settings["lr"], settings["adapter"]) == (
        6,
        0.2,
        {"adapter_len": 4, "adapter_layers": 4, "method": "llama-adapter"},
    )
    with open(out / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    val_rows = [r for r in metrics if r["val_loss"]]
    assert len(val_rows) == 1 + 6  # before training, then once per epoch
    assert float(val_rows[0]["val_loss"]) == pytest.approx(summary["val_loss_before"])
    assert float(val_rows[-1]["val_loss"]) == pytest.approx(summary["val_loss_after"])
    assert len([r for r in metrics if r["train_loss"]]) == summary["steps"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The saved adapter reproduces the trained model.
    fresh = make_model(adapter_len=4, adapter_layers=4, seed=0)
    fresh.load_adapter_weights(out / WEIGHTS_NAME)
    ids = torch.tensor([tokenizer(templates.format_prompt("Say hi."))["input_ids"]])
    torch.testing.assert_close(fresh(ids), model.eval()(ids))


def test_max_steps_stops_early(make_model, rows_file, tmp_path):
    model = make_model()
    cfg = TrainConfig(
        data=str(rows_file), out=str(tmp_path / "run"), epochs=50, batch_size=2, max_steps=3, val_fraction=0.25
    )
    assert train(cfg, model.config, model)["steps"] == 3


def test_the_default_max_len_follows_a_shorter_context_and_a_longer_one_asked_for_is_refused(make_model, tmp_path):
    model = make_model(max_position_embeddings=256)  # shorter than the default --max-len, 512
    long_prompt = {"instruction": "word " * 30, "input": "", "output": "hi"}  # a prompt of 291 tokens
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"}] * 4 + [long_prompt]
    cfg = TrainConfig(data="rows", out=str(tmp_path / "run"), max_steps=1, val_fraction=0.0)
    assert train(cfg, model.config, model, rows=rows)["dropped_rows"] == 1  # it would fit 512, not 256
    asked = TrainConfig(data="rows", out=str(tmp_path / "asked"), max_steps=1, max_len=257)
    with pytest.raises(ValueError, match=r"max_len must be <= 256 \(the base's context\), got 257"):
        train(asked, model.config, model, rows=rows)


def digits_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that knows only digits and adds no BOS: it leaves out what it cannot read, the whole prompt."""
    specials = ["<pad>", "<s>", "</s>"]
    core = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(specials + list(string.digits))}, merges=[]))
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_rows_whose_response_trains_nothing_are_left_out_before_training(make_base, tmp_path):
    """A token is trained on by predicting it from the one before: a response that begins the sequence (here, after a
    prompt of no tokens) trains from its second token on, and a response of one token (EOS) trains nothing."""
    model = LlamaAdapterModel(make_base(), digits_tokenizer(), AdapterConfig(3, 2))
    rows = [{"instruction": "Add.", "input": "", "output": answer} for answer in ("42", "no digits", "7", "none")]
    cfg = TrainConfig(data="rows", out=str(tmp_path / "run"), epochs=1, batch_size=1, val_fraction=0.0)
    summary = train(cfg, model.config, model, rows=rows)
    assert (summary["steps"], summary["dropped_rows"]) == (2, 2)
    none = TrainConfig(data="rows", out=str(tmp_path / "none"), epochs=1, batch_size=1, val_fraction=0.0)
    with pytest.raises(sources.DataError, match=r"rows: no training row keeps a response token within --max-len 512"):
        train(none, model.config, model, rows=rows[1::2])


def test_a_run_without_validation_rows_says_so_in_valid_json(make_model, rows_file, tmp_path, capsys):
    """val_fraction 0 holds nothing out: the summary says null (strict JSON has no NaN) and no 'loss nan' is printed."""
    model = make_model()
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(rows_file), out=str(out), epochs=1, batch_size=2, max_steps=2, val_fraction=0.0)
    summary = train(cfg, model.config, model)
    assert summary["val_loss_before"] is None and summary["val_loss_after"] is None
    json.dumps(summary, allow_nan=False)
    assert "nan" not in capsys.readouterr().err


def test_zero_gates_validation_loss_is_the_base_models(make_model, tokenizer, rows_file, tmp_path):
    """Before training, the adapter model's loss is exactly the frozen base's, as the paper's zero-init promises."""
    model = make_model()
    examples, _ = encoding.encode_all(tokenizer, reading.load_rows(rows_file), max_len=512)
    batch = batching.collate(examples[:4], tokenizer.pad_token_id)
    logits = model.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    base_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert model.loss(**batch).item() == pytest.approx(base_loss.item(), rel=1e-6)


def test_eos_weight_multiplies_the_loss_of_each_response_end(make_model, tokenizer, rows_file):
    model = make_model()
    examples, _ = encoding.encode_all(tokenizer, reading.load_rows(rows_file), max_len=512)
    batch = batching.collate(examples[:4], tokenizer.pad_token_id)
    logits = model.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # zero gates
    targets = batch["labels"][:, 1:].flatten()
    scored = targets != -100
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1)[scored], targets[scored], reduction="none"
    )
    ends = targets[scored] == tokenizer.eos_token_id
    assert ends.sum() == 4  # one EOS closes each response
    expected = (token_losses.sum() + 2 * token_losses[ends].sum()) / scored.sum()
    assert model.loss(**batch, eos_weight=3.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_training_with_eos_weight_makes_ending_likelier(make_model, tokenizer, rows_file, tmp_path):
    """The same run twice, EOS weighing 1 and 4 in the loss: the second ends the training answers more surely."""
    examples, _ = encoding.encode_all(tokenizer, reading.load_rows(rows_file), max_len=512)
    batch = batching.collate(examples, tokenizer.pad_token_id)

    def end_logprob(eos_weight: float) -> float:
        model = make_model(adapter_len=4, adapter_layers=4)
        cfg = TrainConfig(
            data=str(rows_file), out=str(tmp_path / f"eos-{eos_weight}"), epochs=6, batch_size=4, lr=0.2,
            val_fraction=0.25, eos_weight=eos_weight,
        )  # fmt: skip
        train(cfg, model.config, model)
        with torch.no_grad():
            logprobs = model.eval()(batch["input_ids"], batch["attention_mask"]).log_softmax(-1)[:, :-1]
        ends = batch["labels"][:, 1:] == tokenizer.eos_token_id
        return logprobs[..., tokenizer.eos_token_id][ends].mean().item()

    assert end_logprob(4.0) > end_logprob(1.0) + 0.1  # measured: -3.40 against -3.66


def test_cli_train_then_chat(tiny_base_dir, rows_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    flags = "--max-steps 2 --batch-size 2 --epochs 1 --adapter-layers 2 --adapter-len 3 --lr 0.01 --seed 1"
    cli.main(["train", "--base", str(tiny_base_dir), "--data", str(rows_file), "--out", str(out), *flags.split()])
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2
    saved = json.loads((out / CONFIG_NAME).read_text())
    assert saved["adapter"] == {"adapter_len": 3, "adapter_layers": 2, "method": "llama-adapter"}
    assert saved["base"]["name"] == str(tiny_base_dir)

    cli.main(["chat", "--adapter", str(out), "--max-new-tokens", "5", "Repeat the word red."])
    printed = capsys.readouterr().out
    model = LlamaAdapterModel.load(out, dtype=PRECISIONS[default_precision(answering=True)])  # chat's default
    assert printed == model.generate("Repeat the word red.", sampling=cli.SamplingConfig(max_new_tokens=5)) + "\n"


def test_cli_chat_interactive_reads_until_empty_line(tiny_base_dir, monkeypatch, capsys):
    answers = iter(["Say hi.", "Say bye.", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    cli.main(["chat", "--base", str(tiny_base_dir), "--max-new-tokens", "3"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Interactive chat")
    # The second answer follows the whole conversation, not the second instruction alone.
    model, greedy = LlamaAdapterModel.from_base(str(tiny_base_dir)), cli.SamplingConfig(max_new_tokens=3)
    first = model.generate("Say hi.", sampling=greedy)
    second = "".join(stream(model, format_conversation([("Say hi.", first)], "Say bye."), greedy))
    assert printed[1:] == [first, second] and second != model.generate("Say bye.", sampling=greedy)


def test_cli_reports_bad_input_without_a_traceback(tiny_base_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl: line 2: missing field 'output'"):
        cli.main(["train", "--base", str(tiny_base_dir), "--data", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no such folder"):
        cli.main(["chat", "--base", str(tmp_path / "missing-model"), "hi"])
    with pytest.raises(SystemExit, match="no adapter config"):
        cli.main(["chat", "--adapter", str(tmp_path), "hi"])
