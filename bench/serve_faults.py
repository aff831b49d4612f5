"""`llama-adapter serve` under load with faulty clients among the good ones: are the good answers still right and
as fast, and does the server keep its memory?

    python bench/serve_faults.py               # writes bench/results/serve_faults.json

The embedded SmolLM2 with the shelf's `alpaca` adapter, served by `llama-adapter serve` in a process of its own on a
loopback port. Good clients (threads of the official `openai` client) ask Alpaca instructions, greedy, twice: alone
(clean), then with faulty clients sending the whole time (faulty). The faults, in turn:

- bad values: `NaN` temperature, a seed past 2^64, `n` 2, an empty prompt, an unknown field;
- clients that leave: a non-streamed request whose client disconnects after 0.2 s, a stream closed after its first
  chunk;
- huge bodies: 25 MB with its Content-Length, 21 MB chunked (no length given), a 15 MB prompt in a body the server
  takes;
- a slow reader: a stream read 64 bytes at a time, every 0.2 s.

Every good answer is compared with the library's own greedy answer to the same prompt (`generation.answer_batch`,
in this process). Latency is each good request's, sent to last byte; memory is the server's resident set, read
after each phase once it has settled.
"""

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import openai
from common import ALPACA, RESULTS, write_results

from llama_adapter.config import ModelConfig, SamplingConfig
from llama_adapter.data import templates
from llama_adapter.serving import generation
from llama_adapter.serving.models import load_model

MODEL = "alpaca"
GOALS = {"good_answers_right": 1.0, "memory_growth_mib": 64}  # 64 MiB: the allocator's own noise, not a leak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="good clients at once")
    parser.add_argument("--requests", type=int, default=32, help="good requests in each phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--faulty-clients", type=int, default=4)
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--out", default=str(RESULTS / "serve_faults.json"))
    args = parser.parse_args()

    asked = [
        row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "") for row in json.loads(ALPACA.read_text())
    ][-args.requests :]  # the sample's last rows: the same every run
    want = library_answers(asked, args.max_tokens)
    server = start_server(args.port)
    url = f"http://127.0.0.1:{args.port}/v1"
    try:
        good(url, asked[:2], args.clients, args.max_tokens)  # warm-up
        results = {"model": MODEL, "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens}
        results["faulty_clients"] = args.faulty_clients
        results["memory_mib"] = {"warm": settled_memory(server.pid)}
        results["clean"] = phase(url, asked, want, args, faults=0)
        results["memory_mib"]["after_clean"] = settled_memory(server.pid)
        results["faulty"] = phase(url, asked, want, args, faults=args.faulty_clients)
        results["memory_mib"]["after_faulty"] = settled_memory(server.pid)
        results["health_after"] = urllib.request.urlopen(url.removesuffix("/v1") + "/health").status
    finally:
        server.terminate()
        results["exit_status_on_sigterm"] = server.wait(60)
    clean, faulty = results["clean"]["latency_s"], results["faulty"]["latency_s"]
    results["ratios"] = {
        "good_answers_right": min(results["clean"]["right"], results["faulty"]["right"]) / args.requests,
        "p50_faulty_over_clean": faulty["p50"] / clean["p50"],
        "p99_faulty_over_clean": faulty["p99"] / clean["p99"],
        "memory_growth_mib": results["memory_mib"]["after_faulty"] - results["memory_mib"]["after_clean"],
    }
    results["goals"] = GOALS
    write_results(results, args.out)


def library_answers(asked: list[str], max_tokens: int) -> list[str]:
    """The library's greedy answer to each message, as the server prompts it (one user message)."""
    model = load_model(ModelConfig(), MODEL)
    sampling = SamplingConfig(max_new_tokens=max_tokens)
    return [generation.answer_batch(model, [templates.format_conversation([], t)], sampling)[0].text for t in asked]


def start_server(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "llama_adapter.cli", "serve", "--port", str(port), "--max-batch", "16"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    for line in server.stderr:
        if "Serving" in line:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # drain the log
            break
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
            return server
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer on port {port}")


def settled_memory(pid: int) -> float:
    """The server's resident set in MiB, after a few quiet seconds (freed buffers go back first)."""
    time.sleep(5)
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def phase(url: str, asked: list[str], want: list[str], args, faults: int) -> dict:
    """The good requests from `args.clients` threads, with `faults` faulty clients sending until they are done."""
    done, sent = threading.Event(), []
    with concurrent.futures.ThreadPoolExecutor(faults or 1) as pool:
        faulty = [pool.submit(fault_loop, url, i, done, sent) for i in range(faults)]
        answers = good(url, asked, args.clients, args.max_tokens)
        done.set()
        for future in faulty:
            future.result()
    latencies = sorted(seconds for _, seconds in answers)
    statuses = {}
    for kind, status in sent:
        statuses.setdefault(kind, {}).setdefault(str(status), 0)
        statuses[kind][str(status)] += 1
    return {
        "right": sum(text == expected for (text, _), expected in zip(answers, want)),
        "latency_s": {"p50": statistics.median(latencies), "p99": latencies[round(0.99 * (len(latencies) - 1))]},
        "faults": statuses,
    }


def good(url: str, asked: list[str], clients: int, max_tokens: int) -> list[tuple[str, float]]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def ask(text: str) -> tuple[str, float]:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0
        )
        return reply.choices[0].message.content, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(ask, asked))


def chat(fields: str = "") -> bytes:
    return (
        '{"model": "' + MODEL + '", "messages": [{"role": "user", "content": "Tell me a story."}]' + fields + "}"
    ).encode()


FAULTS = {
    "NaN temperature": lambda url: post(url, chat(', "temperature": NaN')),
    "seed past 2^64": lambda url: post(url, chat(', "seed": 18446744073709551616, "temperature": 1')),
    "n 2": lambda url: post(url, chat(', "n": 2')),
    "empty prompt": lambda url: post(url, ('{"model": "' + MODEL + '", "prompt": ""}').encode(), "/completions"),
    "unknown field": lambda url: post(url, chat(', "best_of_all": true')),
    "leaves before the answer": lambda url: leave(url, chat(', "max_tokens": 200'), after=0.2),
    "closes its stream": lambda url: leave(url, chat(', "max_tokens": 200, "stream": true'), after=None),
    "25 MB body": lambda url: post(url, b" " * (25 << 20)),
    "21 MB chunked": lambda url: chunked(url, 21 << 20),
    "15 MB prompt": lambda url: post(url, chat(', "max_tokens": 4').replace(b"Tell me a story.", b"word " * (3 << 20))),
    "slow reader": lambda url: slow_reader(url, chat(', "max_tokens": 64, "stream": true')),
}


def fault_loop(url: str, offset: int, done: threading.Event, sent: list) -> None:
    kinds = list(FAULTS)
    i = offset
    while not done.is_set():
        kind = kinds[i % len(kinds)]
        sent.append((kind, FAULTS[kind](url)))
        i += 1


def connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(url.split(":")[2].split("/")[0])), timeout=120)


def head(path: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST /v1{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{size}\r\n\r\n".encode()


def post(url: str, body: bytes, path: str = "/chat/completions") -> int:
    """The status of a request sent whole (what a server that stops reading at its limit answers is read too)."""
    with connect(url) as sock:
        try:
            sock.sendall(head(path, len(body)) + body)
        except OSError:
            pass  # refused before the body ended: the answer is waiting
        return status_of(sock)


def chunked(url: str, size: int) -> int:
    with connect(url) as sock:
        sock.sendall(head("/chat/completions", None))
        try:
            for _ in range(size >> 20):
                sock.sendall(b"100000\r\n" + b" " * (1 << 20) + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        return status_of(sock)


def leave(url: str, body: bytes, after: float | None) -> str:
    """Send, then leave: after `after` seconds, or after the first bytes of the answer."""
    with connect(url) as sock:
        sock.sendall(head("/chat/completions", len(body)) + body)
        time.sleep(after) if after is not None else sock.recv(1)
    return "left"


def slow_reader(url: str, body: bytes) -> str:
    with connect(url) as sock:
        sock.sendall(head("/chat/completions", len(body)) + body)
        while sock.recv(64):
            time.sleep(0.2)
    return "read all"


def status_of(sock: socket.socket) -> int | str:
    try:
        line = sock.makefile("rb").readline()
        return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        return "reset"


if __name__ == "__main__":
    main()
