"""A LLaMA folder whose tokenizer is only SentencePiece's `tokenizer.model` (as LLaMA-1/2 checkpoints ship): it
loads, adds BOS as LLaMA's tokenizer does, and trains, chats and evaluates through `--base`.

The SentencePiece model is trained here, offline, on a few hundred generated sentences; the LLaMA is tiny and
random. Nothing is downloaded.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_adapter import cli
from llama_adapter.base import loading

spm = pytest.importorskip("sentencepiece", reason="sentencepiece is a dependency: pip install sentencepiece")

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "water", "fire", "cold", "hot", "write", "say"]
VOCAB = 400  # 256 byte pieces (byte_fallback, as LLaMA's) and the rest learnt


def corpus(n: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "." for _ in range(n)]
    return "\n".join(
        lines + ["Below is an instruction that describes a task. ### Instruction: ### Response: 0123456789"]
    )


def sentencepiece_llama(folder: Path, tokenizer_config: bool) -> Path:
    """A tiny random LLaMA with a freshly trained SentencePiece tokenizer.model and no tokenizer.json."""
    folder.mkdir(parents=True)
    (folder / "corpus.txt").write_text(corpus())
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (folder / "sp.model").rename(folder / "tokenizer.model")
    for leftover in ("sp.vocab", "corpus.txt"):
        (folder / leftover).unlink()
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    if tokenizer_config:  # what LLaMA-2's folders hold beside tokenizer.model
        settings = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize("tokenizer_config", [True, False], ids=["with tokenizer_config.json", "tokenizer.model only"])
def test_a_sentencepiece_tokenizer_loads_as_llama_uses_it(tmp_path, tokenizer_config):
    folder = sentencepiece_llama(tmp_path / "llama", tokenizer_config)
    tokenizer = loading.load_tokenizer(str(folder))
    ids = tokenizer("Write a poem about the sun.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Write a poem about the sun."
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert ids[1:] == processor.encode("Write a poem about the sun.")  # the same pieces as SentencePiece itself


def test_train_chat_and_eval_through_base_on_a_sentencepiece_folder(tmp_path, capsys):
    folder = str(sentencepiece_llama(tmp_path / "llama", tokenizer_config=False))
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"instruction": "Say a colour.", "input": "", "output": c} for c in WORDS[:8]]))
    run = tmp_path / "run"
    cli.main(["train", "--base", folder, "--data", str(rows), "--out", str(run), "--max-steps", "2",
              "--adapter-len", "2", "--adapter-layers", "1"])  # fmt: skip
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    cli.main(["chat", "--adapter", str(run), "--base", folder, "--max-new-tokens", "3", "Say a colour."])
    capsys.readouterr()  # an answer, or none: a random model may end at once; what matters is that it ran
    sqa = tmp_path / "sqa"
    sqa.mkdir()
    problem = {"question": "Is fire hot?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None,
               "subject": "natural science", "grade": "grade2", "split": "test"}  # fmt: skip
    (sqa / "problems.json").write_text(json.dumps({"1": problem}))
    (sqa / "pid_splits.json").write_text(json.dumps({"test": ["1"]}))
    out = tmp_path / "preds.jsonl"
    cli.main(["eval", "scienceqa", "--data", str(sqa), "--adapter", str(run), "--base", folder, "--out", str(out)])
    assert len(out.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [('{"tokenizer_class": "LlamaTokenizer",\n "add_bos_token": }', r"line 2, column 19"), ("[1, 2]", r"found list")],
    ids=["malformed", "not an object"],
)
def test_a_bad_tokenizer_config_is_named(tmp_path, settings, message):
    folder = sentencepiece_llama(tmp_path / "llama", tokenizer_config=False)
    (folder / "tokenizer_config.json").write_text(settings)
    with pytest.raises(ValueError, match=rf"tokenizer_config\.json: .*{message}"):
        loading.load_tokenizer(str(folder))
