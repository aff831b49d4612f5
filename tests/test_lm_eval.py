"""lm-evaluation-harness as a client of `llama-adapter serve`: the same multiple-choice task (the first 20 of
ARC-Easy's test questions in tests/fixtures/lm_eval/) scored by the harness's own Hugging Face backend on the embedded
SmolLM2, and by its `local-completions` backend against the server, gives the same log-likelihoods and the same
accuracy; against a served shelf adapter, the library's own log-likelihoods."""

import itertools

import pytest
from conftest import REPO_ROOT
from test_serve import Server

from llama_adapter import DEFAULT_BASE
from llama_adapter.base import loading
from llama_adapter.config import ModelConfig
from llama_adapter.serving import logprobs
from llama_adapter.serving.models import load_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")
from lm_eval.tasks import TaskManager  # noqa: E402 - after the skip

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("all_cores")]  # the real SmolLM2: 200 continuations a run

TASK = "arc_easy_first50"
TOLERANCE = 1e-4  # per continuation: a sum of float32 log-probabilities over a few tokens, batched differently
BATCH = 16  # continuations per forward pass, and per request to the server
QUESTIONS = 20  # of the task's 50: 80 continuations, scored twice a test on two cores


@pytest.fixture(scope="module")
def tasks(data_dir, tmp_path_factory) -> TaskManager:
    """The fixture's task, reading ARC-Easy's test rows from the data folder."""
    rows = data_dir / "llm-adapters" / "ARC-Easy" / "test.json"
    if not rows.is_file():
        pytest.skip(f"{rows} not found (LLM-Adapters' ARC-Easy test set; see ../shared/data/llm-adapters/SOURCES.md)")
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    fixture = REPO_ROOT / "tests" / "fixtures" / "lm_eval" / f"{TASK}.yaml"
    (folder / f"{TASK}.yaml").write_text(f"include: {fixture}\ndataset_kwargs:\n  data_files:\n    test: {rows}\n")
    return TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def served():
    """The server over the embedded SmolLM2 alone and the shelf's `alpaca` adapter on it, as `serve` loads them."""
    config = ModelConfig(precision="fp32")
    alpaca = load_model(config, "alpaca")
    server = Server({DEFAULT_BASE: load_model(config, None, alongside=alpaca), "alpaca": alpaca}, max_batch=BATCH)
    yield server
    server.stop()


def evaluate(tasks: TaskManager, backend: str, **model_args) -> tuple[float, list[list[float]], list[dict]]:
    """The task's accuracy, each question's log-likelihood per option, and the harness's samples, in the task's order."""
    out = lm_eval.simple_evaluate(
        model=backend,
        model_args=model_args,
        tasks=[TASK],
        task_manager=tasks,
        batch_size=BATCH,
        log_samples=True,
        limit=QUESTIONS,
    )
    samples = sorted(out["samples"][TASK], key=lambda sample: sample["doc_id"])
    assert len(samples) == QUESTIONS
    scores = [[loglikelihood for loglikelihood, _ in sample["filtered_resps"]] for sample in samples]
    return out["results"][TASK]["acc,none"], scores, samples


def through_server(tasks: TaskManager, served: Server, model: str):
    return evaluate(
        tasks, "local-completions", model=model, base_url=served.url + "/completions",
        tokenizer=str(loading.default_base_dir()), tokenizer_backend="huggingface", max_retries=1,
    )  # fmt: skip


def assert_close(actual: list[list[float]], expected: list[list[float]]):
    worst = max(abs(a - e) for row, want in zip(actual, expected) for a, e in zip(row, want, strict=True))
    assert worst <= TOLERANCE, f"a log-likelihood differs by {worst:.2e}"


def test_the_harness_scores_the_served_base_as_it_scores_the_model_itself(tasks, served):
    local_accuracy, local, _ = evaluate(
        tasks, "hf", pretrained=str(loading.default_base_dir()), dtype="float32", device="cpu"
    )
    served_accuracy, remote, _ = through_server(tasks, served, DEFAULT_BASE)
    assert_close(remote, local)
    assert served_accuracy == local_accuracy


def test_the_harness_scores_a_served_adapter_as_the_library_does(tasks, served):
    accuracy, remote, samples = through_server(tasks, served, "alpaca")
    model, tokenizer = served.models["alpaca"], served.models["alpaca"].tokenizer
    pairs = [pair for sample in samples for pair in sample["arguments"]]
    # As the harness splits a pair: the whole text's tokens, the context's first.
    sequences = [
        tokenizer(context + continuation, add_special_tokens=False)["input_ids"] for context, continuation in pairs
    ]
    starts = [len(tokenizer(context, add_special_tokens=False)["input_ids"]) for context, _ in pairs]
    scored = [
        row
        for at in range(0, len(sequences), BATCH)
        for row in logprobs.token_logprobs(model, sequences[at : at + BATCH])
    ]
    library = [sum(entry.logprob for entry in row[start:]) for row, start in zip(scored, starts)]
    ends = list(itertools.accumulate(len(sample["arguments"]) for sample in samples))  # each question's options
    expected = [library[end - len(sample["arguments"]) : end] for end, sample in zip(ends, samples)]
    assert_close(remote, expected)
    right = sum(max(range(len(row)), key=row.__getitem__) == sample["target"] for row, sample in zip(expected, samples))
    assert accuracy == right / len(samples)
