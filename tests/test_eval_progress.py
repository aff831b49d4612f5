"""The evaluation progress bar moves as each row of a generating batch ends, and counts every question once."""

import copy

import pytest
from test_scienceqa import sqa_dir  # noqa: F401 - the ScienceQA fixture folder

from llama_adapter import AdapterConfig, LlamaAdapterModel
from llama_adapter.config import SamplingConfig
from llama_adapter.data.templates import format_prompt
from llama_adapter.evaluation import predict, scienceqa
from llama_adapter.evaluation.llm_adapters import Question
from llama_adapter.evaluation.predictions import read_predictions
from llama_adapter.serving.generation import answer_batch

NEW_TOKENS = 6


def end_rows(base, at: dict[int, int]) -> list[int]:
    """Steer `base` so that in every generate call row r picks EOS at step at[r] and at no other step, nor any other
    row ever. Returns [the step of the generate call in progress], kept current by the hook."""
    eos = base.config.eos_token_id
    step = [0]

    def steer(module, args, kwargs, output):
        step[0] = 1 if kwargs["input_ids"].shape[1] > 1 else step[0] + 1  # a prompt's prefill: a new call's step 1
        logits = output.logits.clone()
        logits[..., eos] = -1e4
        for row, when in at.items():
            if when == step[0] and row < logits.shape[0]:
                logits[row, -1, eos] = 1e4
        output.logits = logits
        return output

    base.register_forward_hook(steer, with_kwargs=True)
    return step


@pytest.mark.parametrize("pad", ["own pad token", "padded with EOS"])
def test_each_row_is_counted_once_at_the_step_it_ends(make_base, tokenizer, pad):
    """Row 0 ends at step 2, row 2 at step 4, row 1 at the length limit. An ended row goes on as padding, which is
    EOS itself where the tokenizer has no pad token: never counted again."""
    if pad == "padded with EOS":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = None
    model = LlamaAdapterModel(make_base(), tokenizer, AdapterConfig())
    step = end_rows(model.base, {0: 2, 2: 4})
    prompts = [format_prompt("Hi."), format_prompt("A much longer question?"), format_prompt("Why?")]
    counts = []
    answers = answer_batch(
        model, prompts, SamplingConfig(max_new_tokens=NEW_TOKENS), on_row_done=lambda n: counts.append((step[0], n))
    )
    assert [(a.tokens, a.stopped) for a in answers] == [(2, True), (NEW_TOKENS, False), (4, True)]
    assert counts == [(2, 1), (4, 1), (NEW_TOKENS, 1)]


def test_without_a_callback_generate_gets_no_stopping_criteria(make_model, monkeypatch):
    """The server's path pays nothing for the count."""
    model = make_model()
    calls, generate = [], model.base.generate
    monkeypatch.setattr(model.base, "generate", lambda **kwargs: calls.append(kwargs) or generate(**kwargs))
    sampling = SamplingConfig(max_new_tokens=2)
    answer_batch(model, [format_prompt("Hi.")], sampling)
    answer_batch(model, [format_prompt("Hi.")], sampling, on_row_done=lambda n: None)
    assert ["stopping_criteria" in kwargs for kwargs in calls] == [False, True]


@pytest.mark.parametrize("benchmark", ["scienceqa", "math"])
def test_the_bar_moves_as_rows_end_and_reaches_the_total_once(make_model, sqa_dir, tmp_path, monkeypatch, benchmark):  # noqa: F811
    """Batch row 0 ends at step 2, the others at the limit: the bar moves at step 2, before the batch ends. A resumed
    run starts where the file is and ends at the number of questions, every record written."""
    model = make_model()
    step = end_rows(model.base, {0: 2})
    bars = []

    class Bar:
        def __init__(self, total, initial, **_):
            self.total, self.n, self.moves = total, initial, []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def update(self, n=1):
            self.n += n
            self.moves.append((step[0], self.n))  # (the generate step it came at, the bar's count)

    monkeypatch.setattr(predict, "tqdm", Bar)
    out = tmp_path / "preds.jsonl"
    if benchmark == "scienceqa":
        questions, _ = scienceqa.load_problems(sqa_dir, "test", missing_images="text-only")

        def run(asked):
            predict.evaluate_problems(model, asked, out, batch_size=3, max_new_tokens=NEW_TOKENS)
    else:
        questions = [Question(f"gsm8k/{i}", "gsm8k", f"What is {i} + {i}?", "", str(2 * i)) for i in range(6)]

        def run(asked):
            predict.evaluate_questions(model, asked, out, ("gsm8k",), batch_size=3, max_new_tokens=NEW_TOKENS)

    assert len(questions) == 6
    run(questions[:2])
    run(questions)  # resumed: the 4 left, as a batch of 3 and one of 1 (which ends at step 2)
    assert [(bar.total, bar.moves) for bar in bars] == [
        (2, [(2, 1), (NEW_TOKENS, 2)]),
        (6, [(2, 3), (NEW_TOKENS, 5), (2, 6)]),
    ]
    assert len(read_predictions(out)) == 6
