"""`llama-adapter serve` under load: throughput and latency with 1, 4 and 16 concurrent clients, batched against one
request at a time; a single client against calling the library directly; and 16 clients spread over 4 adapters
against 16 on one adapter and against the adapters taking turns; all in one run.

    python bench/serve.py                      # writes bench/results/serve.json

The embedded SmolLM2 with the shelf's `alpaca` adapter, served on a loopback port by uvicorn in this process, twice:
with `--max-batch 16` (batched) and with `--max-batch 1` (one request at a time, the others queued). Each client is
a thread of the official `openai` client asking its share of the same Alpaca instructions (the sample's last rows) one after
another, greedy, at most --max-tokens new tokens each. tokens/s counts completion tokens (usage) over the wall time
of the whole level; latency is each request's, first byte to last. "library" answers the same instructions one at a
time with `generation.answer_batch`, which is what a single client would get without the server.

"adapters": four adapters are four copies of `alpaca` (its weights loaded four times, four sets of modules), so that
every setting does the same work (the same greedy answers, which the results check) and the ratios measure the
batching alone. "one_adapter": the 16 clients all ask `alpaca`; "mixed": client requests go round the four copies,
which share one base object and so one batch; "turns": the four copies each on their own copy of the base, which is
what adapters that cannot share a batch get: the bases take turns, a decoding step each.
"""

import argparse
import concurrent.futures
import json
import statistics
import time

import openai
import torch
from common import ALPACA, RESULTS, write_results

from llama_adapter import LlamaAdapterModel
from llama_adapter.base import structure
from llama_adapter.config import ModelConfig, SamplingConfig
from llama_adapter.data import templates
from llama_adapter.serving import generation
from llama_adapter.serving.api import ServerThread, build_app
from llama_adapter.serving.models import load_models

MODEL = "alpaca"
ADAPTERS = 4
GOALS = {
    "batched_16_over_one_at_a_time": 4.0,
    "one_client_over_library": 0.9,
    "mixed_over_one_adapter": 0.9,
    "mixed_over_turns": 2.0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests at each level, shared among the clients")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    models = load_models(ModelConfig(), (MODEL,), "base")
    asked = [
        row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "") for row in json.loads(ALPACA.read_text())
    ]
    asked = asked[-args.requests :]  # the sample's last rows: the same every run
    prompts = [templates.format_conversation([], text) for text in asked]  # what the server makes of one user message
    library = library_speed(models[MODEL], prompts, args.max_tokens)  # the same requests as each level
    results = {"model": MODEL, "requests": args.requests, "max_tokens": args.max_tokens, "library": library}
    for label, max_batch in (("batched", max(args.clients)), ("one_at_a_time", 1)):
        results[label] = {
            str(n): serve_load(models, [MODEL], asked, n, args.max_tokens, max_batch) for n in args.clients
        }
        print(label, json.dumps(results[label], indent=2), flush=True)
    top = max(args.clients)
    results["adapters"] = adapters_load(models[MODEL], asked, top, args.max_tokens)
    print("adapters", json.dumps(results["adapters"], indent=2), flush=True)
    speed = {label: results["adapters"][label]["tokens_per_s"] for label in ("one_adapter", "mixed", "turns")}
    results["ratios"] = {
        "batched_16_over_one_at_a_time": results["batched"][str(top)]["tokens_per_s"]
        / results["one_at_a_time"][str(top)]["tokens_per_s"],
        "one_client_over_library": results["batched"]["1"]["tokens_per_s"] / library["tokens_per_s"],
        "mixed_over_one_adapter": speed["mixed"] / speed["one_adapter"],
        "mixed_over_turns": speed["mixed"] / speed["turns"],
    }
    results["goals"] = GOALS
    write_results(results, args.out)


def library_speed(model, prompts: list[str], max_tokens: int) -> dict:
    """Completion tokens per second answering the prompts one at a time with the library, no server."""
    sampling = SamplingConfig(max_new_tokens=max_tokens)
    generation.answer_batch(model, prompts[:1], SamplingConfig(max_new_tokens=4))  # warm-up
    start, tokens = time.perf_counter(), 0
    for prompt in prompts:
        [answer] = generation.answer_batch(model, [prompt], sampling)
        tokens += answer.tokens - answer.stopped  # the EOS token is not a completion token (usage does not count it)
    return {"requests": len(prompts), "tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - start)}


def serve_load(models: dict, names: list[str], asked: list[str], clients: int, max_tokens: int, max_batch: int) -> dict:
    """Serve `models` in batches of up to `max_batch` rows and load it as `load` does."""
    server = ServerThread(build_app(models, None, max_batch, queue=4 * clients))
    try:
        return load(server.url, names, asked, clients, max_tokens)
    finally:
        server.stop()


def adapters_load(model: LlamaAdapterModel, asked: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` clients on one adapter, on ADAPTERS copies of it sharing its base (one batch), and on ADAPTERS copies
    each on its own copy of the base (turns)."""
    shared = copies(model, shared=True)
    results = {
        "one_adapter": serve_load({MODEL: model}, [MODEL], asked, clients, max_tokens, clients),
        "mixed": serve_load(shared, list(shared), asked, clients, max_tokens, clients),
    }
    for copy in shared.values():
        copy.unload()
    apart = copies(model, shared=False)
    results["turns"] = serve_load(apart, list(apart), asked, clients, max_tokens, clients)
    results["same_tokens"] = len({level["tokens"] for level in results.values()}) == 1
    return results


def copies(model: LlamaAdapterModel, shared: bool) -> dict[str, LlamaAdapterModel]:
    """ADAPTERS adapters with `model`'s weights, on its base object or each on a copy of the base."""
    made = {}
    for i in range(1, ADAPTERS + 1):
        base = model.base if shared else structure.copy_base(model.base)
        copy = LlamaAdapterModel(base, model.tokenizer, model.config, model.visual_config).eval()
        with torch.no_grad():
            for name, param in copy.adapter_state().items():
                param.copy_(model.adapter_state()[name])
        made[f"{MODEL}-{i}"] = copy
    return made


def load(url: str, names: list[str], asked: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` threads each asking their share of the messages in turn, message i of model names[i % len(names)];
    totals and latencies."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    for name in names:  # warm-up
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi."}], max_tokens=4)

    def ask(i: int) -> tuple[int, float]:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=names[i % len(names)], messages=[{"role": "user", "content": asked[i]}], max_tokens=max_tokens,
            temperature=0,
        )  # fmt: skip
        return reply.usage.completion_tokens, time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answered = list(pool.map(ask, range(len(asked))))
    wall = time.perf_counter() - start
    latencies = sorted(seconds for _, seconds in answered)
    tokens = sum(count for count, _ in answered)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "latency_s": {"median": statistics.median(latencies), "p90": latencies[int(0.9 * (len(latencies) - 1))]},
    }


if __name__ == "__main__":
    main()
