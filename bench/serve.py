"""`llama-adapter serve` under load: throughput and latency with 1, 4 and 16 concurrent clients, batched against one
request at a time, and a single client against calling the library directly, all in one run.

    python bench/serve.py                      # writes bench/results/serve.json

The embedded SmolLM2 with the shelf's `alpaca` adapter, served on a loopback port by uvicorn in this process, twice:
with `--max-batch 16` (batched) and with `--max-batch 1` (one request at a time, the others queued). Each client is
a thread of the official `openai` client asking its share of the same Alpaca instructions (the sample's last rows) one after
another, greedy, at most --max-tokens new tokens each. tokens/s counts completion tokens (usage) over the wall time
of the whole level; latency is each request's, first byte to last. "library" answers the same instructions one at a
time with `generation.answer_batch`, which is what a single client would get without the server.
"""

import argparse
import concurrent.futures
import json
import statistics
import time

import openai
import torch
from common import ALPACA, RESULTS, write_results

from llama_adapter.config import ModelConfig, SamplingConfig
from llama_adapter.data import templates
from llama_adapter.serving import generation
from llama_adapter.serving.api import ServerThread, build_app
from llama_adapter.serving.models import load_models

MODEL = "alpaca"
GOALS = {"batched_16_over_one_at_a_time": 4.0, "one_client_over_library": 0.9}


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
        server = ServerThread(build_app(models, None, max_batch, queue=4 * max(args.clients)))
        try:
            results[label] = {str(n): load(server.url, asked, n, args.max_tokens) for n in args.clients}
        finally:
            server.stop()
        print(label, json.dumps(results[label], indent=2), flush=True)
    top = str(max(args.clients))
    results["ratios"] = {
        "batched_16_over_one_at_a_time": results["batched"][top]["tokens_per_s"]
        / results["one_at_a_time"][top]["tokens_per_s"],
        "one_client_over_library": results["batched"]["1"]["tokens_per_s"] / library["tokens_per_s"],
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


def load(url: str, asked: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` threads each asking their share of the messages in turn; totals and latencies."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi."}], max_tokens=4)  # warm-up

    def ask(text: str) -> tuple[int, float]:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0
        )
        return reply.usage.completion_tokens, time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answered = list(pool.map(ask, asked))
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
