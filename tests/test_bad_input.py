"""Bad input at every entry point (train, eval, chat, demo, convert, resuming): a clear error that names the file and
the line, row or field, a non-zero exit, and nothing already saved is changed.

Each case builds its bad file in a workspace that also holds a base model, a trained adapter, a finished training
run with its checkpoints and an earlier predictions file; after the failed command every one of those is byte for
byte what it was. `scripts/bad_input_table.py` runs these same cases and writes the table in docs/bad-input.md.
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP, build_tokenizer, register_tiny_clip, tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file

from llama_adapter import DEFAULT_BASE, AdapterConfig, cli
from llama_adapter.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from llama_adapter.config import BaseModelConfig, VisualConfig
from llama_adapter.data.reading import MAX_ROW_CHARS
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.serving import demo
from llama_adapter.train import checkpoint
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

ADAPTER_FLAGS = ["--adapter-len", "3", "--adapter-layers", "2"]
ROW = {"instruction": "Say hi.", "input": "", "output": "hi"}
RUN = {"max_steps": 2, "save_every": 1}  # the workspace's training run, besides its data, output and base


@dataclass
class Workspace:
    """What a user already has on disk when a command meets bad input: all of it must survive."""

    root: Path

    def path(self, name: str) -> str:
        return str(self.root / name)

    base = property(lambda self: self.path("base"))
    other_base = property(lambda self: self.path("other-base"))  # another shape: hidden size 32
    adapter = property(lambda self: self.path("adapter"))  # text-only, on base
    visual_adapter = property(lambda self: self.path("visual-adapter"))  # tiny random CLIP, on base
    run = property(lambda self: self.path("run"))  # a finished training run with its checkpoint
    rows = property(lambda self: self.path("rows.json"))  # the rows that run trained on
    sqa = property(lambda self: self.path("sqa"))  # a ScienceQA folder of two problems
    predictions = property(lambda self: self.path("preds/test.jsonl"))  # an earlier evaluation's


def build_workspace(root: Path) -> Workspace:
    from transformers import LlamaForCausalLM

    ws = Workspace(root)
    register_tiny_clip(root)
    tokenizer = build_tokenizer()
    for folder, width in ((ws.base, 64), (ws.other_base, 32)):
        torch.manual_seed(0)
        LlamaForCausalLM._from_config(tiny_config(tokenizer, hidden_size=width)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    for folder, visual in ((ws.adapter, None), (ws.visual_adapter, VisualConfig(clip_model=TINY_CLIP))):
        LlamaAdapterModel.from_base(ws.base, AdapterConfig(3, 2), device="cpu", visual=visual).save(folder)
    Path(ws.rows).write_text(json.dumps([ROW | {"output": f"hi {i}"} for i in range(8)]))
    train(TrainConfig(**RUN, data=ws.rows, out=ws.run, model=BaseModelConfig(base=ws.base)), AdapterConfig(3, 2))
    Path(ws.sqa).mkdir()
    problem = {"question": "Is ice cold?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None}
    problem |= {"subject": "natural science", "grade": "grade2", "split": "test"}
    Path(ws.sqa, "problems.json").write_text(json.dumps({"1": problem, "2": problem | {"question": "Is fire hot?"}}))
    Path(ws.sqa, "pid_splits.json").write_text(json.dumps({"test": ["1", "2"]}))
    Path(ws.predictions).parent.mkdir()
    cli.main(["eval", "scienceqa", "--data", ws.sqa, "--base", ws.base, "--out", ws.predictions, "--limit", "1"])
    return ws


def snapshot(ws: Workspace) -> dict[str, str]:
    """Every file of the workspace but the cases' own, by content."""
    return {
        str(path.relative_to(ws.root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(ws.root.rglob("*"))
        if path.is_file() and path.relative_to(ws.root).parts[0] != "cases"
    }


# ----------------------------------------------------------------------------------------------------------
# The cases: each writes its bad input into `here` and returns the command's arguments


def write(here: Path, name: str, content: str | bytes) -> str:
    path = here / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def jsonl(*rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def csv_rows(here: Path, *rows: str | bytes) -> str:
    """rows.csv: an Alpaca header line, then each row on a line of its own."""
    lines = [row if isinstance(row, bytes) else row.encode() for row in (b"instruction,input,output", *rows)]
    return write(here, "rows.csv", b"".join(line + b"\n" for line in lines))


def train_on(ws: Workspace, data: str, *more: str) -> list[str]:
    """Train into the earlier run's folder, --no-resume: were the data read too late, its checkpoints would go."""
    return ["train", "--base", ws.base, "--data", data, "--out", ws.run, "--no-resume", "--max-steps", "1", *more]


def parquet(here: Path, rows: list[dict]) -> str:
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(here / "rows.parquet")
    return str(here / "rows.parquet")


def image_rows(here: Path, image: str) -> str:
    return write(here, "rows.jsonl", jsonl(ROW, ROW | {"image": image}))


def train_with_image(ws: Workspace, here: Path, image: str) -> list[str]:
    return train_on(ws, image_rows(here, image), "--clip-model", "tiny-test-clip")


def write_png(here: Path) -> str:
    Image.new("RGB", (8, 8), "red").save(here / "ok.png")
    return "ok.png"


def corrupt_png(here: Path) -> str:
    return write(here, "corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def truncated_png(here: Path) -> str:
    Image.effect_noise((64, 64), 64).convert("RGB").save(here / "full.png")
    return write(here, "truncated.png", (here / "full.png").read_bytes()[:2000])


def bomb_png(here: Path) -> str:
    Image.new("1", (10_000, 10_000)).save(here / "bomb.png")  # 100 megapixels in 12 kB
    return str(here / "bomb.png")


def adapter_copy(ws: Workspace, here: Path, damage: Callable[[Path], None]) -> str:
    folder = here / "adapter"
    shutil.copytree(ws.adapter, folder)
    damage(folder)
    return str(folder)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def not_finite(folder: Path) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    name = next(name for name in sorted(tensors) if name.endswith("adapter_prompt"))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, folder / WEIGHTS_NAME)


def edit_config(**changes) -> Callable[[Path], None]:
    """Set top-level fields of adapter_config.json; a dict value updates that section."""

    def damage(folder: Path) -> None:
        config = json.loads((folder / CONFIG_NAME).read_text())
        for key, value in changes.items():
            config[key] = config[key] | value if isinstance(value, dict) else value
        (folder / CONFIG_NAME).write_text(json.dumps(config))

    return damage


def resume_damaged(ws: Workspace, here: Path, damage: Callable[[Path], None]) -> list[str]:
    """Resume a copy of the workspace's run, its checkpoint damaged, with the run's own settings."""
    folder = here / "run"
    shutil.copytree(ws.run, folder)
    damage(checkpoint.latest(folder))
    settings = [f"--{key.replace('_', '-')}={value}" for key, value in RUN.items()]
    return ["train", "--base", ws.base, "--data", ws.rows, "--out", str(folder), *settings, *ADAPTER_FLAGS]


def unfinished_and_torn(folder: Path) -> None:
    """A checkpoint of a run that had not finished, its tensors file cut short (a disk fault: saves are atomic)."""
    state = json.loads((folder / checkpoint.STATE_JSON).read_text())
    state["progress"]["done"] = False
    (folder / checkpoint.STATE_JSON).write_text(json.dumps(state))
    truncate(folder / checkpoint.STATE_TENSORS)


def sqa_copy(ws: Workspace, here: Path, edit: Callable[[dict], None]) -> str:
    folder = here / "sqa"
    shutil.copytree(ws.sqa, folder)
    problems = json.loads((folder / "problems.json").read_text())
    edit(problems)
    (folder / "problems.json").write_text(json.dumps(problems))
    return str(folder)


def sqa_to_train_on(ws: Workspace, here: Path) -> str:
    """A copy of the ScienceQA folder whose problem 1 is in the train split."""
    folder = sqa_copy(ws, here, lambda problems: None)
    Path(folder, "pid_splits.json").write_text(json.dumps({"train": ["1"], "test": ["2"]}))
    return folder


ARC_ROW = {
    "instruction": "Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: steam "
    "Answer2: ice\n\nAnswer format: answer1/answer2",
    "input": "",
    "output": "the correct answer is answer1",
    "answer": "answer1",
}


def eval_on(ws: Workspace, data: str) -> list[str]:
    return ["eval", "scienceqa", "--data", data, "--base", ws.base, "--out", ws.predictions]


def sqa_with_image(ws: Workspace, here: Path, image: Callable[[Path], str] | None) -> str:
    """A copy of the ScienceQA folder whose problem 2 (not predicted yet) shows an image: the file `image` writes, or
    none at all."""
    folder = sqa_copy(ws, here, lambda problems: problems["2"].update(image="image.png"))
    if image is not None:
        (Path(folder) / "images" / "test" / "2").mkdir(parents=True)
        shutil.move(image(here), Path(folder) / "images" / "test" / "2" / "image.png")
    return folder


def chat_about(ws: Workspace, image: str) -> list[str]:
    return ["chat", "--adapter", ws.visual_adapter, "--image", image, "What colour is it?"]


def sqa_split(ws: Workspace, here: Path, pids: list[str]) -> str:
    """A copy of the ScienceQA folder whose test split lists `pids`."""
    folder = sqa_copy(ws, here, lambda problems: None)
    Path(folder, "pid_splits.json").write_text(json.dumps({"test": pids}))
    return folder


def llava_twice(here: Path) -> str:
    """LLaVA's test questions, one of them listed twice."""
    entry = {"id": "7", "conversations": [{"from": "human", "value": "Is ice cold?\nA. yes\nB. no"},
                                          {"from": "gpt", "value": "A"}]}  # fmt: skip
    return write(here, "llava.json", json.dumps([entry, entry]))


def lora_on_base(ws: Workspace, here: Path, base_name: str | None = None) -> str:
    """A LoRA adapter on the workspace's base, which merge folds; `base_name`: the base its config names."""
    model = LlamaAdapterModel.from_base(ws.base, AdapterConfig(method="lora", lora_rank=2), device="cpu")
    model.save(here / "lora")
    if base_name is not None:
        edit_config(base={"name": base_name})(here / "lora")
    return str(here / "lora")


def linked(here: Path, target: str) -> str:
    (here / "link").symlink_to(target)
    return str(here / "link")


class EvilPickle:
    """Unpickling this would run a command: what a malicious checkpoint does."""

    def __reduce__(self):
        return (subprocess.call, (["touch", "/tmp/llama-adapter-pwned"],))


def evil_pth(here: Path) -> str:
    torch.save({"adapter_query.weight": torch.zeros(6, 64), "payload": EvilPickle()}, here / "evil.pth")
    return str(here / "evil.pth")


@dataclass
class Case:
    entry: str  # the command
    name: str  # the bad input, as the docs table names it
    argv: Callable[[Workspace, Path], list[str]]
    message: str  # a regular expression the error must match, after the file name


CASES = [
    Case("train", "malformed JSON list", lambda ws, h: train_on(ws, write(h, "rows.json", '[{"instruction": "a",\n "output": ]')),
         r"rows.json: invalid JSON at line 2, column 12: Expecting value"),
    Case("train", "malformed JSONL line", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl(ROW, '{"instruction": "a",'))),
         r"rows.jsonl: line 2: invalid JSON: Expecting property name"),
    Case("train", "row missing a field", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl(ROW, {"instruction": "a"}))),
         r"rows.jsonl: line 2: missing field 'output'"),
    Case("train", "field of the wrong type", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl(ROW | {"input": 7}))),
         r"rows.jsonl: line 1: field 'input' must be a string, got int"),
    Case("train", "empty instruction", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl(ROW | {"instruction": " "}))),
         r"rows.jsonl: line 1: field 'instruction' is empty"),
    Case("train", "empty output", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl(ROW, ROW, ROW | {"output": ""}))),
         r"rows.jsonl: line 3: field 'output' is empty"),
    Case("train", "non-UTF-8 text", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl(ROW).encode() + b'{"a": "\xff"}\n')),
         r"rows.jsonl: line 2: not UTF-8 text \(byte 7 of the line\)"),
    Case("train", "one enormous row", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl(ROW, ROW | {"input": "x" * MAX_ROW_CHARS}))),
         r"rows.jsonl: line 2: 1,000,009 characters, more than the 1,000,000 a row may hold"),
    Case("train", "empty dataset", lambda ws, h: train_on(ws, write(h, "rows.jsonl", "\n\n")),
         r"rows.jsonl: no rows"),
    Case("train", "every row bad, --on-bad-row skip", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl({"a": 1}, "[")), "--on-bad-row", "skip"),
         r"rows.jsonl: no usable rows: all 2 are bad"),
    Case("train", "missing data file", lambda ws, h: train_on(ws, str(h / "nowhere.json")),
         r"nowhere.json: no such file"),
    Case("train", "CSV row with an empty output", lambda ws, h: train_on(ws, write(h, "rows.csv", "instruction,input,output\nSay hi.,,hi\nSay bye.,,\n")),
         r"rows.csv: row 1: field 'output' is empty"),
    Case("train", "CSV row with an extra field", lambda ws, h: train_on(ws, csv_rows(h, "Say hi.,,hi", "Say bye.,,bye,now")),
         r"rows.csv: row 1: 4 field\(s\) where the header names 3"),
    Case("train", "CSV row missing a field", lambda ws, h: train_on(ws, csv_rows(h, "Say hi.,,hi", "Say bye.,bye")),
         r"rows.csv: row 1: 2 field\(s\) where the header names 3"),
    Case("train", "CSV quote never closed", lambda ws, h: train_on(ws, csv_rows(h, "Say hi.,,hi", '"Say bye.,,bye', "Say yes.,,yes")),
         r"rows.csv: row 1: a quoted field that never closes"),
    Case("train", "CSV not UTF-8 in its first row", lambda ws, h: train_on(ws, csv_rows(h, b"Say h\xe9.,,hi")),
         r"rows.csv: row 0: field 'instruction': not UTF-8 text \(byte 5 of the field\)"),
    Case("train", "CSV not UTF-8 far into the file", lambda ws, h: train_on(ws, csv_rows(h, *["Say hi.,,hi"] * 2000, b"Say h\xe9.,,hi")),
         r"rows.csv: row 2000: field 'instruction': not UTF-8 text \(byte 5 of the field\)"),
    Case("train", "CSV of a header alone", lambda ws, h: train_on(ws, csv_rows(h)),
         r"rows.csv: no rows"),
    Case("train", "Parquet without the columns", lambda ws, h: train_on(ws, parquet(h, [{"prompt": "Say hi.", "completion": "hi"}])),
         r"rows.parquet: no column instruction or output \(columns: prompt, completion\); --columns maps the fields"),
    Case("train", "--columns naming an unknown field", lambda ws, h: train_on(ws, ws.rows, "--columns", "question=prompt"),
         r"columns: cannot rename question; the fields are instruction, input, output, image"),
    Case("train", "a hub dataset, offline", lambda ws, h: train_on(ws, "tatsu-lab/alpaca"),
         r"tatsu-lab/alpaca: not a local file or folder, and the Hugging Face hub cannot be reached"),
    Case("train", "data file of an unknown kind", lambda ws, h: train_on(ws, write(h, "rows.txt", "Say hi.")),
         r"rows.txt: not a data file this reads: expected one of .json, .jsonl, .csv, .parquet"),
    Case("train", "missing image", lambda ws, h: train_with_image(ws, h, "gone.png"),
         r"rows.jsonl: 1 image\(s\) cannot be used, e.g. .*gone.png: no such image file; --on-bad-row skip leaves their rows"),
    Case("train", "unreadable image (a folder)", lambda ws, h: train_with_image(ws, h, (h / "folder.png").mkdir() or "folder.png"),
         r"rows.jsonl: 1 image\(s\) cannot be used, e.g. .*folder.png: cannot be read \(Is a directory\)"),
    Case("train", "corrupt image", lambda ws, h: train_with_image(ws, h, corrupt_png(h)),
         r"rows.jsonl: 1 image\(s\) cannot be used, e.g. .*corrupt.png: not a readable image"),
    Case("train", "truncated image", lambda ws, h: train_with_image(ws, h, truncated_png(h)),
         r"rows.jsonl: 1 image\(s\) cannot be used, e.g. .*truncated.png: not a readable image \(image file is truncated"),
    Case("train", "decompression-bomb image", lambda ws, h: train_with_image(ws, h, bomb_png(h)),
         r"rows.jsonl: 1 image\(s\) cannot be used, e.g. .*bomb.png: too many pixels \(over 64,000,000\) for an image; refused"),
    Case("train", "--image-data without V2", lambda ws, h: train_on(ws, ws.rows, "--image-data", image_rows(h, "x.png"), "--clip-model", "tiny-test-clip"),
         r"--image-data trains a multimodal adapter's image side apart from its text side: it needs --method llama-adapter-v2 and --clip-model \(got --method llama-adapter\)"),
    Case("train", "--image-data row without an image", lambda ws, h: train_on(ws, ws.rows, "--image-data", image_rows(h, write_png(h)), "--method", "llama-adapter-v2", "--clip-model", "tiny-test-clip"),
         r"rows.jsonl: row 1 has no image; every --image-data row needs one"),
    Case("train", "--extra-train without --task scienceqa", lambda ws, h: train_on(ws, ws.rows, "--extra-train", write(h, "train.json", json.dumps([ARC_ROW]))),
         r"--extra-train, --explanation and --answer-form shape ScienceQA's rows: they need --task scienceqa"),
    Case("train", "--extra-train row that is no choice question", lambda ws, h: train_on(ws, sqa_to_train_on(ws, h), "--task", "scienceqa", "--extra-train", write(h, "train.json", json.dumps([ARC_ROW, ARC_ROW | {"answer": "answer3"}]))),
         r"train.json: row 1: field 'answer' is 'answer3', expected one of answer1..answer2"),
    Case("train", "--out is an existing file", lambda ws, h: train_on(ws, ws.rows)[:-5] + ["--out", write(h, "taken", "x")],
         r"--out .*taken: a file, expected a folder"),
    Case("train", "--out where nothing can be written", lambda ws, h: train_on(ws, ws.rows)[:-5] + ["--out", "/sys/llama-adapter-run"],
         r"--out /sys/llama-adapter-run: cannot write in /sys \("),
    Case("train", "--lr 0", lambda ws, h: train_on(ws, ws.rows, "--lr", "0"),
         r"argument --lr: must be > 0, got 0"),
    Case("train", "--max-len beyond the base's context", lambda ws, h: train_on(ws, ws.rows, "--max-len", "100000"),
         r"max_len must be <= 512 \(the base's context\), got 100000"),
    Case("train", "--max-len that cuts off every response", lambda ws, h: train_on(ws, ws.rows, "--max-len", "20"),
         r"rows.json: no training row keeps a response token within --max-len 20"),
    Case("train", "--adapter-len far too large", lambda ws, h: train_on(ws, ws.rows, "--adapter-len", str(10**12)),
         r"adapter_len must be <= 512 on this base"),
    Case("train", "text no tokenizer can encode", lambda ws, h: train_on(ws, write(h, "rows.jsonl", '{"instruction": "a\\ud800", "output": "b"}\n')),
         r"rows.jsonl: line 1: field 'instruction': not valid Unicode text \(a lone surrogate '\\ud800' at character 1\)"),
    Case("train", "a field that is null", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl(ROW, ROW | {"output": None}))),
         r"rows.jsonl: line 2: field 'output' is null"),
    Case("train", "a JSON object wrapping the rows", lambda ws, h: train_on(ws, write(h, "rows.json", json.dumps({"data": [ROW]}, indent=2))),
         r"rows.json: one JSON object \(keys 'data'\), not rows: expected a JSON list of rows, or JSONL"),
    Case("train", "--data that is not UTF-8", lambda ws, h: train_on(ws, "rows-\udcff.json"),
         r"--data: 'rows-\\udcff.json' is not UTF-8 text"),
    Case("train", "missing base path", lambda ws, h: ["train", "--base", str(h / "no-model"), "--data", ws.rows, "--out", str(h / "o")],
         r"--base '.*no-model': no such folder"),
    Case("train", "pretrained CLIP weights, offline", lambda ws, h: train_on(ws, ws.rows, "--clip-model", "ViT-B-32", "--clip-weights", "openai"),
         r"--clip-weights 'openai': ViT-B-32's weights are not in the Hugging Face cache and the hub cannot be reached; download them where it can be \(hf download timm/vit_base_patch32_clip_224.openai\)"),
    Case("train", "a bad row, in two processes (--nproc 2)", lambda ws, h: train_on(ws, write(h, "rows.jsonl", jsonl(ROW, {"instruction": "a"})), "--nproc", "2"),
         r"rows.jsonl: line 2: missing field 'output'$"),
    Case("train", "resume: torn trainer_state.json", lambda ws, h: resume_damaged(ws, h, lambda c: truncate(c / checkpoint.STATE_JSON)),
         r"trainer_state.json: invalid JSON at line \d+, column \d+"),
    Case("train", "resume: torn trainer_state.safetensors", lambda ws, h: resume_damaged(ws, h, unfinished_and_torn),
         r"trainer_state.safetensors: not a readable safetensors file"),
    Case("train", "resume with other settings", lambda ws, h: resume_damaged(ws, h, lambda c: None) + ["--lr", "0.5"],
         r"step-00000002: made with other settings \{'lr': \(0.000140625, 0.5\)\}"),
    Case("eval", "ScienceQA answer index out of range", lambda ws, h: eval_on(ws, sqa_copy(ws, h, lambda p: p["2"].update(answer=5))),
         r"problems.json: problem 2: field 'answer' must be an integer index into the 2 choices, got 5"),
    Case("eval", "ScienceQA problem missing a field", lambda ws, h: eval_on(ws, sqa_copy(ws, h, lambda p: p["1"].pop("question"))),
         r"problems.json: problem 1: missing field 'question'"),
    Case("eval", "missing image", lambda ws, h: eval_on(ws, sqa_with_image(ws, h, None)),
         r"problems.json: problem 2: image .*images/test/2/image.png not found \(1 of 2 problems of split 'test' lack their image\); --missing-images text-only"),
    Case("eval", "corrupt image", lambda ws, h: eval_on(ws, sqa_with_image(ws, h, corrupt_png))[:-2] + ["--out", str(h / "p.jsonl"), "--adapter", ws.visual_adapter],
         r"1 image\(s\) cannot be used, e.g. .*images/test/2/image.png: not a readable image"),
    Case("eval", "torn predictions file", lambda ws, h: eval_on(ws, ws.sqa)[:-2] + ["--out", write(h, "p.jsonl", '{"pid": "1"}\n')],
         r"p.jsonl: line 1: not a prediction record: no prompt, output, pred, pred_letter, answer, correct"),
    Case("eval", "ScienceQA split naming a problem twice", lambda ws, h: eval_on(ws, sqa_split(ws, h, ["1", "2", "1"]))[:-2] + ["--out", str(h / "p.jsonl")],
         r"pid_splits.json: split 'test' names problem 1 twice"),
    Case("eval", "LLaVA questions naming a problem twice", lambda ws, h: eval_on(ws, ws.sqa)[:-2] + ["--llava", llava_twice(h), "--out", str(h / "p.jsonl")],
         r"llava.json: entry 1 \(id 7\): id 7 again \(entry 0 has it too\)"),
    Case("chat", "missing image", lambda ws, h: chat_about(ws, str(h / "gone.png")),
         r"gone.png: no such image file"),
    Case("chat", "truncated image", lambda ws, h: chat_about(ws, truncated_png(h)),
         r"truncated.png: not a readable image \(image file is truncated"),
    Case("chat", "decompression-bomb image", lambda ws, h: chat_about(ws, bomb_png(h)),
         r"bomb.png: too many pixels"),
    Case("chat", "image for a text-only adapter", lambda ws, h: ["chat", "--adapter", ws.adapter, "--image", corrupt_png(h), "hi"],
         r"this adapter is text-only \(trained without --clip-model\); it cannot take images"),
    Case("chat", "corrupt adapter.safetensors", lambda ws, h: ["chat", "--adapter", adapter_copy(ws, h, lambda a: (a / WEIGHTS_NAME).write_bytes(b"junk" * 100)), "hi"],
         r"adapter.safetensors: not a readable safetensors file"),
    Case("chat", "truncated adapter.safetensors", lambda ws, h: ["chat", "--adapter", adapter_copy(ws, h, lambda a: truncate(a / WEIGHTS_NAME)), "hi"],
         r"adapter.safetensors: not a readable safetensors file"),
    Case("chat", "malformed adapter_config.json", lambda ws, h: ["chat", "--adapter", adapter_copy(ws, h, lambda a: truncate(a / CONFIG_NAME)), "hi"],
         r"adapter_config.json: invalid JSON at line \d+, column \d+"),
    Case("chat", "adapter made for a different base", lambda ws, h: ["chat", "--adapter", ws.adapter, "--base", ws.other_base, "hi"],
         r"adapter_config.json: this adapter was trained on a different base model .*hidden_size: adapter has 64, base has 32"),
    Case("chat", "missing base path", lambda ws, h: ["chat", "--base", str(h / "no-model"), "hi"],
         r"--base '.*no-model': no such folder"),
    Case("chat", "adapter whose base is no folder here, offline", lambda ws, h: ["chat", "--adapter", adapter_copy(ws, h, edit_config(base={"name": "v2m"})), "hi"],
         r"adapter_config.json: base 'v2m': no folder of that name in the working folder, no model of that name in the Hugging Face cache, and the hub cannot be reached"),
    Case("chat", "prompt longer than the base's context", lambda ws, h: ["chat", "--base", ws.base, "word " * 600],
         r"the prompt is [\d,]+ tokens; the model's context holds 512 with the answer"),
    Case("chat", "instruction that is not UTF-8", lambda ws, h: ["chat", "--base", ws.base, "hi \udcff"],
         r"argument 4: 'hi \\udcff' is not UTF-8 text"),
    Case("chat", "--temperature nan", lambda ws, h: ["chat", "--base", ws.base, "--temperature", "nan", "hi"],
         r"argument --temperature: must be a finite number, got nan"),
    Case("chat", "adapter weights that are not finite", lambda ws, h: ["chat", "--adapter", adapter_copy(ws, h, not_finite), "hi"],
         r"adapter.safetensors: tensor layers.\d.adapter_prompt holds 1 values that are not finite \(NaN or infinity\)"),
    Case("chat", "adapter config: an unexpected key", lambda ws, h: ["chat", "--adapter", adapter_copy(ws, h, edit_config(bogus=1)), "hi"],
         r"adapter_config.json: unexpected field\(s\) 'bogus'"),
    Case("chat", "adapter config: a value of the wrong type", lambda ws, h: ["chat", "--adapter", adapter_copy(ws, h, edit_config(adapter={"adapter_len": "3"})), "hi"],
         r"adapter_config.json: adapter_len must be an integer, got str '3'"),
    Case("chat", "adapter config: an absurd size", lambda ws, h: ["chat", "--adapter", adapter_copy(ws, h, edit_config(adapter={"adapter_len": 10**12})), "hi"],
         r"adapter_config.json: adapter_len must be <= 512 on this base \(the base's context is 512 tokens\), got 1000000000000"),
    Case("eval", "--out is a folder", lambda ws, h: ["eval", "scienceqa", "--data", ws.sqa, "--base", ws.base, "--out", str(h)],
         r"--out .*: a folder, expected a file"),
    Case("eval", "--limit 0", lambda ws, h: eval_on(ws, ws.sqa) + ["--limit", "0"],
         r"argument --limit: must be >= 1, got 0"),
    Case("eval", "--limit -1 (math)", lambda ws, h: ["eval", "math", "--data", str(h), "--base", ws.base, "--out", str(h / "p.jsonl"), "--limit", "-1"],
         r"argument --limit: must be >= 1, got -1"),
    Case("demo", "--port out of range", lambda ws, h: ["demo", "--base", ws.base, "--port", "70000"],
         r"argument --port: must be <= 65535, got 70000"),
    Case("convert", "--out is an existing file", lambda ws, h: ["convert", "--checkpoint", evil_pth(h), "--out", write(h, "taken", "x"), "--base", ws.base],
         r"--out .*taken: a file, expected a folder"),
    Case("merge", "--out is an existing file", lambda ws, h: ["merge", "--adapter", ws.adapter, "--out", write(h, "taken", "x"), "--base", ws.base],
         r"--out .*taken: a file, expected a folder"),
    Case("merge", "not a LoRA or V2 adapter", lambda ws, h: ["merge", "--adapter", ws.adapter, "--out", str(h / "o"), "--base", ws.base],
         r"adapter: a llama-adapter adapter; only llama-adapter-v2 and lora fold into the base weights"),
    Case("merge", "--out is the base", lambda ws, h: ["merge", "--adapter", lora_on_base(ws, h), "--base", ws.base, "--out", ws.base],
         r"--out .*/base: is the base model's folder .*/base; choose a folder outside it"),
    Case("merge", "--out is a link to the base", lambda ws, h: ["merge", "--adapter", lora_on_base(ws, h), "--base", ws.base, "--out", linked(h, ws.base)],
         r"--out .*/link: is the base model's folder .*/base; choose a folder outside it"),
    Case("merge", "--out inside the adapter", lambda ws, h: ["merge", "--adapter", lora_on_base(ws, h), "--base", ws.base, "--out", str(h / "lora" / "merged")],
         r"--out .*/lora/merged: is inside the adapter's folder .*/lora; choose a folder outside it"),
    Case("demo", "corrupt adapter", lambda ws, h: ["demo", "--adapter", adapter_copy(ws, h, lambda a: truncate(a / WEIGHTS_NAME))],
         r"adapter.safetensors: not a readable safetensors file"),
    Case("demo", "not an adapter folder", lambda ws, h: ["demo", "--adapter", str(h / "empty")],
         r"adapter_config.json: no adapter config"),
    Case("convert", "checkpoint with pickled code", lambda ws, h: ["convert", "--checkpoint", evil_pth(h), "--out", str(h / "o"), "--base", ws.base],
         r"evil.pth: refused: it holds pickled Python objects other than tensors .*nothing in it was executed"),
]  # fmt: skip


def run_case(case: Case, ws: Workspace) -> tuple[list[str], int, str]:
    """The command's arguments, its exit code and its error message, run in this process."""
    here = ws.root / "cases" / f"{case.entry}-{case.name}".replace(" ", "-")
    here.mkdir(parents=True)
    argv = case.argv(ws, here)
    try:
        cli.main(argv)
    except SystemExit as exit:
        code = exit.code
        return argv, (1 if isinstance(code, str) else code or 0), code if isinstance(code, str) else ""
    return argv, 0, ""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return build_workspace(tmp_path_factory.mktemp("workspace"))


@pytest.mark.parametrize("case", CASES, ids=[f"{case.entry}: {case.name}" for case in CASES])
def test_bad_input_gets_a_clear_error_and_damages_nothing(case, workspace, monkeypatch):
    monkeypatch.setattr(demo, "launch", lambda *a, **k: pytest.fail("the demo started despite the bad input"))
    before = snapshot(workspace)
    argv, code, message = run_case(case, workspace)
    assert code != 0, f"{argv} succeeded"
    assert argv[0] == case.entry and re.match(rf"llama-adapter( {case.entry}( \w+)?)?: error: ", message), message
    assert re.search(case.message, message), message
    assert "Traceback" not in message
    assert snapshot(workspace) == before
    assert not Path("/tmp/llama-adapter-pwned").exists()


def test_skipping_bad_rows_trains_on_the_rest_and_says_how_many_and_why(workspace, tmp_path, capsys):
    bad = [{"instruction": "a"}, ROW | {"output": " "}, '{"instruction": ', ROW | {"input": ["x"]}]
    rows = write(tmp_path, "rows.jsonl", jsonl(*[ROW | {"output": f"hi {i}"} for i in range(6)], *bad))
    argv = ["train", "--base", workspace.base, "--data", rows, "--out", str(tmp_path / "o"), "--max-steps", "1"]
    cli.main([*argv, "--on-bad-row", "skip"])
    printed = capsys.readouterr()
    assert json.loads(printed.out)["skipped_rows"] == 4
    assert "Skipped 4 of 10 rows (--on-bad-row skip): " in printed.err
    for why in (
        "missing field 'output'",
        "field 'output' is empty",
        "invalid JSON: Expecting value",
        "field 'input' must be a string, got list",
    ):
        assert f"1 x {why}" in printed.err
    assert f"{rows}: line 7: missing field 'output'" in printed.err  # each skipped row named, with its line


def test_skipping_rows_whose_image_is_bad(workspace, tmp_path, capsys):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    good = [ROW | {"output": f"red {i}", "image": "red.png"} for i in range(4)]
    rows = write(tmp_path, "rows.jsonl", jsonl(*good, ROW | {"image": corrupt_png(tmp_path)}))
    argv = ["train", "--base", workspace.base, "--data", rows, "--out", str(tmp_path / "o"), "--max-steps", "1"]
    cli.main([*argv, "--clip-model", TINY_CLIP, "--on-bad-row", "skip", "--val-fraction", "0"])
    printed = capsys.readouterr()
    assert json.loads(printed.out)["skipped_rows"] == 1
    assert f"  {rows}: image {tmp_path / 'corrupt.png'}: not a readable image" in printed.err


def test_the_command_exits_non_zero_with_one_line_and_no_traceback(workspace, tmp_path):
    rows = write(tmp_path, "rows.jsonl", jsonl(ROW, {"instruction": "a"}))
    done = subprocess.run(
        [sys.executable, "-m", "llama_adapter.cli", "train", "--base", workspace.base, "--data", rows, "--out", "o"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"llama-adapter train: error: {rows}: line 2: missing field 'output'"
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_merge_never_writes_over_the_cached_default_base(workspace, tmp_path, monkeypatch):
    """The embedded SmolLM2's cache is the base of every command run without --base: a merge into it ruins them all."""
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    argv = ["merge", "--adapter", lora_on_base(workspace, tmp_path, DEFAULT_BASE), "--out", str(out)]
    with pytest.raises(SystemExit, match=r"--out .*SmolLM2-135M-Instruct: is the base model's folder .*; choose a"):
        cli.main(argv)
    assert not out.exists()


def test_the_demo_listens_on_localhost_only_and_caps_uploads_by_default():
    calls = []

    class App:
        def launch(self, **kwargs):
            calls.append(kwargs)

    demo.launch(App(), cli.DemoConfig())
    assert calls == [
        {
            "server_name": "127.0.0.1",
            "server_port": 7860,
            "share": False,
            "max_file_size": "10mb",
            "prevent_thread_lock": False,
            # and the page itself may load nothing from elsewhere: a message's markdown image or <img> stays inert
            "head": f'<meta http-equiv="Content-Security-Policy" content="{demo.CONTENT_POLICY}">',
        }
    ]
    assert demo.CONTENT_POLICY.startswith("default-src 'self' ")
