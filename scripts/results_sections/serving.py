"""Serving (`bench/results/serve*.json`, `demo_latency.json`): the OpenAI API under load and beside faulty clients,
and the browser demo's latency."""

from .formatting import command_block, para, seconds, speed, table
from .sources import load, provenance


def met(ratio: float, goal: float, higher: bool = True) -> str:
    """A goal's verdict: most goals are a floor to reach, the memory growth a ceiling to stay under."""
    return "met" if (ratio >= goal if higher else ratio <= goal) else "missed"


def serving() -> list[str]:
    path = "bench/results/serve.json"
    r = load(path)
    rows = []
    for clients in r["batched"]:
        batched, alone = r["batched"][clients], r["one_at_a_time"][clients]
        rows.append(
            [
                clients,
                speed(batched["tokens_per_s"]),
                speed(alone["tokens_per_s"]),
                f"**{batched['tokens_per_s'] / alone['tokens_per_s']:.2f}**",
                f"{seconds(batched['latency_s']['median'])} / {seconds(batched['latency_s']['p90'])}",
                f"{seconds(alone['latency_s']['median'])} / {seconds(alone['latency_s']['p90'])}",
            ]
        )
    ratios, goals = r["ratios"], r["goals"]
    batched_goal = met(ratios["batched_16_over_one_at_a_time"], goals["batched_16_over_one_at_a_time"])
    library_goal = met(ratios["one_client_over_library"], goals["one_client_over_library"])
    return [
        "### Serving the OpenAI API: `llama-adapter serve` under load",
        "",
        *provenance(path, r),
        *para(
            f"The shelf's `{r['model']}` on the embedded SmolLM2, served in-process on a loopback port; the last",
            f"{r['requests']} instructions of the Alpaca sample at each level, greedy, at most {r['max_tokens']} new",
            "tokens each, shared among the",
            "clients (threads of the `openai` client, each asking in turn). tokens/s counts completion tokens over the",
            "level's wall time; latency is per request, median / 90th percentile, in seconds.",
        ),
        *table(
            [
                "clients",
                "batched tokens/s",
                "one at a time tokens/s",
                "batched / one at a time",
                "batched latency",
                "one-at-a-time latency",
            ],
            rows,
        ),
        *para(
            f"Goals: {goals['batched_16_over_one_at_a_time']:.0f}× the one-at-a-time throughput with the most clients:",
            f"{ratios['batched_16_over_one_at_a_time']:.2f}× ({batched_goal}); one client within",
            f"{1 - goals['one_client_over_library']:.0%} of the library answering the same instructions directly",
            f"({speed(r['library']['tokens_per_s'])} tokens/s): {ratios['one_client_over_library']:.2f}×",
            f"({library_goal}).",
        ),
        *(_many_adapters(r) if "adapters" in r else []),
    ]


def _many_adapters(r: dict) -> list[str]:
    """16 clients over 4 adapters in one batch, against one adapter and against the adapters taking turns."""
    levels, ratios, goals = r["adapters"], r["ratios"], r["goals"]
    labels = {
        "one_adapter": "one adapter",
        "mixed": "4 adapters, one batch",
        "turns": "4 adapters, taking turns",
    }
    rows = [
        [
            label,
            speed(levels[key]["tokens_per_s"]),
            f"{seconds(levels[key]['latency_s']['median'])} / {seconds(levels[key]['latency_s']['p90'])}",
        ]
        for key, label in labels.items()
    ]
    one = met(ratios["mixed_over_one_adapter"], goals["mixed_over_one_adapter"])
    turns = met(ratios["mixed_over_turns"], goals["mixed_over_turns"])
    return [
        *para(
            "**Many adapters.** The same requests from 16 clients: all to one adapter; spread over 4 adapters",
            "that share one base object (one batch); and spread over 4 adapters each on its own copy of the base,",
            "which take turns a decoding step each (how the server ran several adapters before they could share a",
            "batch). The 4 are",
            f"copies of `{r['model']}`, so every setting does the same work: same completion tokens in all three:",
            f"{'yes' if levels['same_tokens'] else 'NO'}.",
        ),
        *table(["16 clients on", "tokens/s", "latency"], rows),
        *para(
            f"Goals: mixed ≥ {goals['mixed_over_one_adapter']}× one adapter:",
            f"{ratios['mixed_over_one_adapter']:.2f}× ({one}); mixed ≥ {goals['mixed_over_turns']:.0f}× taking turns:",
            f"{ratios['mixed_over_turns']:.2f}× ({turns}).",
        ),
    ]


def serving_faults() -> list[str]:
    path = "bench/results/serve_faults.json"
    r = load(path)
    memory, ratios, goals = r["memory_mib"], r["ratios"], r["goals"]
    phases = [
        ["alone (clean)", r["clean"], memory["after_clean"] - memory["warm"]],
        [f"beside {r['faulty_clients']} faulty clients", r["faulty"], memory["after_faulty"] - memory["after_clean"]],
    ]
    rows = [
        [
            label,
            f"{phase['right']} of {r['requests']}",
            seconds(phase["latency_s"]["p50"]),
            seconds(phase["latency_s"]["p99"]),
            f"{grown:+.0f}",
        ]
        for label, phase, grown in phases
    ]
    faults = [
        [kind, str(sum(statuses.values())), ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))]
        for kind, statuses in r["faulty"]["faults"].items()
    ]
    right = met(ratios["good_answers_right"], goals["good_answers_right"])
    kept = met(ratios["memory_growth_mib"], goals["memory_growth_mib"], higher=False)
    return [
        "### Serving beside faulty clients: `llama-adapter serve` keeps its answers and its memory",
        "",
        *provenance(path, r),
        *para(
            "`llama-adapter serve` (the embedded SmolLM2 and the shelf's adapters, `--max-batch 16`) in a process of",
            f"its own; {r['clients']} good clients ask the last {r['requests']} Alpaca instructions, greedy, at most",
            f"{r['max_tokens']} new tokens each, alone and then while {r['faulty_clients']} faulty clients send the",
            "faults below the whole time. A good answer is right when it equals the library's own greedy answer to",
            "the same prompt; latency is per good request, in seconds; memory is the server's resident set, after a",
            "few quiet seconds, grown over the phase, in MiB. The faulty clients run on the same two cores, so the",
            "latency beside them also pays for their CPU.",
        ),
        *table(["good clients", "answers right", "p50 latency", "p99 latency", "server memory grown"], rows),
        *table(["fault", "sent", "what the client got (status: count)"], faults),
        *para(
            f"Goals: every good answer right: {ratios['good_answers_right']:.0%} ({right});",
            f"the server's memory grown by at most {goals['memory_growth_mib']} MiB over the faulty phase:",
            f"{ratios['memory_growth_mib']:+.0f} MiB ({kept}). The good requests' latency",
            f"beside the faults: p50 {ratios['p50_faulty_over_clean']:.2f}×, p99 {ratios['p99_faulty_over_clean']:.2f}×",
            f"of alone. Afterwards `/health` answered {r['health_after']}, and SIGTERM ended the server with status",
            f"{r['exit_status_on_sigterm']}.",
        ),
    ]


def demo_latency() -> list[str]:
    path = "bench/results/demo_latency.json"
    r = load(path)
    body = [
        [
            label,
            f"{seconds(x['first_words_s'])} s",
            f"{seconds(x['total_s'])} s",
            f"{x['tokens']:g}",
            speed(x["tokens_per_s"]),
        ]
        for label, x in (
            ("the library's `model.stream`, no web server (baseline)", r["library"]),
            ("the demo, through its HTTP API", r["demo"]),
        )
    ]
    return [
        "### The browser demo's latency: `python bench/demo_latency.py`",
        "",
        *para(
            f"Command (results in `{path}`; ran with {r['threads']} threads on the dev machine's CPU; this file records",
            "no device or precision):",
        ),
        *command_block(r["command"]),
        *para(
            f"The demo serves the embedded SmolLM2 with the adapters of the command; the first, `{r['model']}`,",
            "answers, and is driven through the demo's HTTP API as a browser would: each question streams up to",
            f"{r['new_tokens']} new tokens greedily, medians over the questions. The baseline, measured in the same run,",
            "is the library's own `model.stream` on the same model and prompts without the web server. The",
            "multimodal adapter the command also offers only appears in the chooser here: no image is asked about,",
            "so nothing below depends on its random CLIP encoder.",
        ),
        *table(["", "first words", "whole answer", "tokens", "tokens/s"], body),
        *para(
            f"The demo takes {r['demo_over_library_time']:.3f}× the library's time for a whole answer (Gradio's work",
            "for each streamed update shares the cores with the model); the adapter panel (summary, heatmap, config)",
            f"of another choice arrives in {seconds(r['adapter_panel_switch_s'])} s, and generation with another",
            "adapter needs no reloading at all: every adapter shares one copy of the base.",
        ),
    ]
