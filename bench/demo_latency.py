"""How quickly the demo answers: time to the first streamed words, words per second, adapter switching.

    python bench/demo_latency.py [--adapter DIR ...]     # writes bench/results/demo_latency.json

Serves the demo on the embedded SmolLM2 (as `llama-adapter demo` does) and drives it through its HTTP API with
gradio_client, like a browser would: each question streams 128 new tokens greedily. The baseline, measured in
the same run, is the library's own `model.stream` on the same model and prompt without the web server, so the
ratio is what the demo's serving (queue, HTTP, chat bookkeeping) costs.
"""

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

import torch
from gradio_client import Client

from llama_adapter.config import DemoConfig, ModelConfig, SamplingConfig
from llama_adapter.serving.demo import BASE_CHOICE, build_app, launch, load_choices

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Give three tips for staying healthy.",
    "Explain in two sentences what a neural network is.",
    "Write a short poem about the sea.",
]
NEW_TOKENS = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", nargs="*", default=[], help="adapters to offer; the first one answers")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "demo_latency.json"))
    args = parser.parse_args()

    choices = load_choices(ModelConfig(), tuple(args.adapter))
    choice = args.adapter[0] if args.adapter else BASE_CHOICE
    model = choices[choice]
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    library = [timed(lambda q=q: model.stream(q, sampling=sampling), model) for q in QUESTIONS]

    app = build_app(choices)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch(app, DemoConfig(port=port), block=False)
    try:
        served = [timed_demo(Client(app.local_url, verbose=False), q, choice, model) for q in QUESTIONS]
        switches = time_switches(Client(app.local_url, verbose=False), list(choices))
    finally:
        app.close()

    results = {
        "command": " ".join(["python bench/demo_latency.py", *(["--adapter", *args.adapter] if args.adapter else [])]),
        "model": choice,
        "threads": torch.get_num_threads(),
        "new_tokens": NEW_TOKENS,
        "library": summarise(library),
        "demo": summarise(served),
        "demo_over_library_time": median(served, "total_s") / median(library, "total_s"),
        "adapter_panel_switch_s": switches,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def timed(start_stream, model) -> dict:
    """First-piece latency, total time and tokens/s of one streamed answer from the library."""
    begin = time.perf_counter()
    first, text = None, ""
    for piece in start_stream():
        first = first or time.perf_counter() - begin
        text += piece
    return measure(begin, first, text, model)


def timed_demo(client: Client, question: str, choice: str, model) -> dict:
    """The same, through the demo's HTTP API: the first update whose answer is non-empty counts as first words."""
    begin = time.perf_counter()
    job = client.submit({"text": question, "files": []}, choice, 0.0, 1.0, NEW_TOKENS, api_name="/chat")
    first = None
    for update in job:
        if first is None and update[0] and answer_of(update[0]).strip():
            first = time.perf_counter() - begin
    return measure(begin, first, answer_of(job.result()[0]), model)


def answer_of(messages: list[dict]) -> str:
    content = messages[-1]["content"]
    return "".join(part.get("text", "") for part in content) if isinstance(content, list) else str(content)


def measure(begin: float, first: float | None, text: str, model) -> dict:
    total = time.perf_counter() - begin
    tokens = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return {"first_words_s": first, "total_s": total, "tokens": tokens, "tokens_per_s": tokens / total}


def time_switches(client: Client, labels: list[str]) -> float:
    """Median seconds for the adapter panel (summary, gate heatmap, config) of another choice to arrive."""
    times = []
    for label in labels * 3:
        begin = time.perf_counter()
        client.predict(label, api_name="/describe")
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def summarise(runs: list[dict]) -> dict:
    return {key: median(runs, key) for key in ("first_words_s", "total_s", "tokens", "tokens_per_s")}


if __name__ == "__main__":
    main()
