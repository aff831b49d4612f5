"""The browser chat demo: a Gradio page over the library's generation API.

Every adapter offered whose method can share a base (LLaMA-Adapter, bottlenecks, DyLoRA) shares one frozen base in
memory (`LlamaAdapterModel.load(..., alongside=...)`), so the chooser switches between them at no cost; PEFT's
methods rebuild their base, so each has a base of its own. The answers of sessions whose adapters share a base decode
together in one batch (`Batcher`), whichever adapter each session chose; those of prefix and prompt tuning, whose virtual
tokens cannot join a batch, generate one at a time.

What the page shows loads nothing from elsewhere: messages and answers go through `safe_markdown`, and the page
carries a content security policy that lets the browser fetch from the demo alone.
"""

import html
import inspect
import logging
import re
from pathlib import Path

import gradio as gr
from matplotlib.figure import Figure

from ..config import DemoConfig, ModelConfig, SamplingConfig
from ..data import synthetic
from ..data.sources import DataError
from ..data.templates import check_text
from ..evaluation.scienceqa import question_instruction
from ..model import LlamaAdapterModel
from ..visual import load_image
from .batcher import Batcher
from .generation import stream_conversation
from .models import load_models

BASE_CHOICE = "base model (no adapter)"
EXAMPLES = Path(__file__).parent / "examples"
# The options in another order for each image: the shapes adapter was trained with them shuffled.
IMAGE_EXAMPLES = {"red-circle.png": ("blue", "red", "green"), "blue-triangle.png": ("green", "red", "blue")}
MAX_UPLOAD = "10mb"
QUEUE_SIZE = 64  # requests waiting beyond this are turned away with "queue full" rather than waiting for ever
CONCURRENCY = 16  # answers decoding at once, in one batch
# The browser may fetch from the demo itself and nothing else: a guard behind safe_markdown, for whatever reaches
# the page some other way (Gradio's own error messages, renderers added in a later Gradio).
CONTENT_POLICY = "default-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:"
log = logging.getLogger(__name__)


def load_choices(model_cfg: ModelConfig, adapters: tuple[str, ...]) -> dict[str, LlamaAdapterModel]:
    """The chooser's models by label: the base alone, each adapter given, then the shelf's adapters for this base."""
    return load_models(model_cfg, adapters, BASE_CHOICE)


def build_app(choices: dict[str, LlamaAdapterModel]) -> gr.Blocks:
    chat = _Chat(choices)
    default = list(choices)[min(1, len(choices) - 1)]  # the first adapter given, else the shelf's first, else the base
    context = next(iter(choices.values())).context_length  # one base serves every choice
    with gr.Blocks(title="LLaMA-Adapter") as app:
        gr.Markdown(
            "## LLaMA-Adapter chat\nA frozen LLaMA-architecture model steered by zero-initialised, gated adaption "
            "prompts. Attach an image to a message for a multimodal adapter."
        )
        turns = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                # No LaTeX: Gradio cuts $$...$$ out before the Markdown is parsed, across code fences.
                chatbot = gr.Chatbot(label="Conversation", height=560, elem_id="conversation", latex_delimiters=[])
                box = gr.MultimodalTextbox(
                    placeholder="Type a message; attach an image (optional) with the clip button",
                    file_types=["image"],
                    file_count="single",
                    sources=["upload"],
                    show_label=False,
                    elem_id="message",
                )
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    retry = gr.Button("Retry", elem_id="retry")
                    clear = gr.Button("Clear", elem_id="clear")
                notes = gr.Markdown(elem_id="notes")
                # Each example comes with the adapter that answers it: choosing one sets both.
                chooser = gr.Dropdown(list(choices), value=default, label="Adapter", elem_id="adapter", render=False)
                gr.Examples(
                    examples=_examples(choices, default), inputs=[box, chooser], label="Examples", elem_id="examples"
                )
            with gr.Column(scale=2):
                chooser.render()
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                longest = min(1024, context // 2)  # leaves the conversation at least half of the context
                max_new_tokens = gr.Slider(1, longest, value=min(256, longest), step=1, label="Max new tokens")
                summary = gr.Markdown(elem_id="adapter-summary")
                gates = gr.Plot(label="Gates per layer and head: tanh(g)", elem_id="gates")
                with gr.Accordion("Adapter config", open=False):
                    config = gr.JSON(show_label=False)

        sampling = [chooser, temperature, top_p, max_new_tokens]
        shown = [chatbot, turns, notes]
        send = box.submit(chat.send, [box, turns, *sampling], [*shown, box], api_name="chat", concurrency_id="generate")
        again = retry.click(chat.retry, [turns, *sampling], shown, api_name="retry", concurrency_id="generate")
        stop.click(None, cancels=[send, again])
        clear.click(lambda: ([], [], ""), None, shown, api_name="clear", queue=False)
        chooser.change(chat.describe, chooser, [summary, gates, config], api_name="describe")
        app.load(chat.describe, chooser, [summary, gates, config])
    app.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return app


def launch(app: gr.Blocks, cfg: DemoConfig, block: bool = True) -> None:
    """Serve the app on cfg.host:cfg.port, never through a public share link; `block=False` returns at once."""
    app.launch(
        server_name=cfg.host,
        server_port=cfg.port,
        share=False,
        max_file_size=MAX_UPLOAD,
        prevent_thread_lock=not block,
        head=f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_POLICY}">',
    )


class _Chat:
    """The event handlers: a conversation is a list of turns {"text", "image", "answer"} in the session's state."""

    def __init__(self, choices: dict[str, LlamaAdapterModel]):
        self.choices = choices
        # Sessions talking to adapters that share a batch decode together, whichever adapter each chose; the others
        # (virtual-token methods) generate on their own, one at a time.
        batchable = {name: model for name, model in choices.items() if model.method.tokens_only}
        self.batcher = Batcher(batchable, max_batch=CONCURRENCY, queue=QUEUE_SIZE) if batchable else None

    def send(self, message: dict | None, turns: list[dict], choice, temperature, top_p, max_new_tokens):
        text = ((message or {}).get("text") or "").strip()
        files = (message or {}).get("files") or []
        try:
            check_text(text, "Your message")  # a lone surrogate (JSON "\ud800") can come through Gradio's JSON API
        except DataError as err:
            raise _refused(str(err)) from None
        if not text:
            raise _refused("Type a message first" + (": an image alone asks nothing." if files else "."))
        image = _checked_image(files[0]) if files else None
        turns = [*turns, {"text": text, "image": image, "answer": ""}]
        cleared = {"text": "", "files": []}
        for update in self._answer(turns, choice, temperature, top_p, max_new_tokens):
            yield *update, cleared
            cleared = gr.skip()  # the user may be typing the next message already

    def retry(self, turns: list[dict], choice, temperature, top_p, max_new_tokens):
        if not turns:
            raise _refused("Nothing to retry yet: send a message first.")
        turns = [*turns[:-1], turns[-1] | {"answer": ""}]
        yield from self._answer(turns, choice, temperature, top_p, max_new_tokens)

    def _answer(self, turns: list[dict], choice, temperature, top_p, max_new_tokens):
        """Stream the last turn's answer: yields (chat messages, turns, notes) after every piece."""
        model = self._model(choice)
        *earlier, turn = turns
        # The adapter sees one image: the latest one in the conversation.
        image = next((t["image"] for t in reversed(turns) if t["image"]), None)
        notes = []
        if image and not model.multimodal:
            notes.append("This adapter has no visual encoder: it answers from the text alone, without the image.")
            image = None
        try:
            sampling = SamplingConfig(int(max_new_tokens), float(temperature), float(top_p))
            exchanges = [(t["text"], t["answer"]) for t in earlier]
            batcher = (self.batcher, choice) if self.batcher and choice in self.batcher.batch_of else None
            pieces, left_out = stream_conversation(model, exchanges, turn["text"], sampling, image, batcher)
        except (ValueError, OSError) as err:  # OSError: an earlier turn's upload that Gradio has since deleted
            raise _refused(str(err), image, *self.choices) from None
        if left_out:
            notes.insert(0, f"The context is full: the {left_out} oldest exchange(s) are left out of the prompt.")
        note = " ".join(notes)
        yield _messages(turns), turns, note
        try:
            for piece in pieces:
                turn["answer"] += piece
                yield _messages(turns), turns, note
        except Exception as err:
            log.exception("generation failed")  # not the user's doing: its traceback, once
            message = _public(f"Generation failed: {type(err).__name__}: {err}", image, *self.choices)
            raise gr.Error(message, print_exception=False) from None
        finally:
            pieces.close()  # a Stop click closes this generator: the model stops at its next token

    def describe(self, choice):
        """The chooser's panel: a summary line, the gate heatmap and the saved config."""
        model = self._model(choice)
        if choice == BASE_CHOICE:
            return f"**{BASE_CHOICE}**: {model.base.name_or_path}, no prompts take part (every gate is 0).", None, {}
        saved = model.saved_config()  # the model's own: read as a path, a shelf name could find another folder here
        summary = f"**{choice}**: {model.config.method}, {model.num_trainable_parameters():,} trainable parameters"
        if not model.prompts:  # gates, prompts and images are LLaMA-Adapter's alone
            return summary + ".", None, saved
        visual = model.visual_config.clip_model
        summary += f"; {model.config.adapter_len} prompts in each of the top {model.config.adapter_layers} layers; " + (
            f"CLIP {visual} image encoder." if visual else "text only (no image encoder)."
        )
        return summary, gate_figure(model), saved

    def _model(self, choice) -> LlamaAdapterModel:
        if choice not in self.choices:
            raise _refused(f"Unknown adapter {choice!r}; choose one of {list(self.choices)}.", *self.choices)
        return self.choices[choice]


def gate_figure(model: LlamaAdapterModel):
    """Heatmap of tanh(gate): one row per adapted layer, one column per head; 0 means the head ignores its prompts."""
    gates = model.gates()
    layers = sorted(gates)
    values = [gates[layer].float().numpy() for layer in layers]
    figure = Figure(figsize=(5, max(2.5, 0.16 * len(layers) + 1)))  # no pyplot: no global figure registry
    axes = figure.subplots()
    image = axes.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    step = max(1, len(layers) // 10)
    axes.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    figure.colorbar(image, ax=axes, label="tanh(gate)")
    figure.tight_layout()
    return figure


def _checked_image(upload) -> str:
    """The uploaded file's path, once it is known to open as an image; a clear message otherwise."""
    path = upload if isinstance(upload, str) else upload.get("path")
    try:
        load_image(path)
    except (ValueError, FileNotFoundError) as err:
        why = str(err).removeprefix(f"{path}: ")
        raise _refused(f"{Path(path).name} cannot be used as an image: {why}", path) from None
    return path


def _refused(message: str, *paths: str | None) -> gr.Error:
    """The error a user's request gets: on the page (`_public`), and one line in the console, where Gradio would print
    a traceback of our code for the user's mistake."""
    log.warning("refused: %s", message)
    return gr.Error(_public(message, *paths), print_exception=False)


# An absolute path, POSIX or Windows, up to a quote or white space (not one in a URL); "name" is its last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])(?:[A-Za-z]:)?[/\\](?:[^\s'\"/\\]+[/\\])+(?P<name>[^\s'\"/\\]*)")


def _public(message: str, *paths: str | None) -> str:
    """An error message fit for the page: server paths reduced to file names, and HTML shown as text.

    The paths given, and paths in their folders, are reduced whole (a name may hold a space); any other absolute
    path up to its first space. Gradio renders an error message as HTML, so a file name or a choice sent through
    the API could carry a tag.
    """
    for path in sorted({str(p) for p in paths if p and Path(p).is_absolute()}, key=len, reverse=True):
        within = re.escape(path) + r"(?:[/\\][^\s'\"/\\]+)*"
        message = re.sub(within, lambda m: re.split(r"[/\\]", m[0])[-1], message)
    return html.escape(_ABSOLUTE_PATH.sub(r"\g<name>", message), quote=False)


def _messages(turns: list[dict]) -> list[dict]:
    messages = []
    for turn in turns:
        if turn["image"]:
            messages.append({"role": "user", "content": {"path": turn["image"]}})
        messages.append({"role": "user", "content": safe_markdown(turn["text"])})
        messages.append({"role": "assistant", "content": safe_markdown(turn["answer"])})
    return messages


# A code fence as CommonMark reads one: up to 3 spaces, then 3 or more backticks (no backtick in the info string
# after them) or tildes.
_FENCE = re.compile(r"(?P<indent> {0,3})(?P<fence>`{3,}(?=[^`]*$)|~{3,})(?P<info>.*)")
_LINES = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")  # splits after each line end: \n, \r\n or \r, as marked.js reads them
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")  # inline `code`, within one line
# What may load something: an HTML tag ("<" then a letter, "/", "!" or "?"), an image, a diagram Gradio draws
# (wherever one starts, in a quote or a list too, with HTML in its labels).
_LOADER = re.compile(r"<[A-Za-z/!?]|!\[|```mermaid")


def safe_markdown(text: str) -> str:
    """The text as Markdown that the chat shows as written, but that makes the browser load nothing.

    Gradio's sanitiser keeps <img>, <video>, srcset and style attributes, and Markdown images are <img> too: a
    message, or an answer a model was talked into, could make the page fetch from any address (and tell it the
    conversation in the URL). Outside fenced code blocks, no "<" that opens a tag, no "![" and no ```mermaid is
    left: they become "&lt;", "!\\[" and "``\\`mermaid", which show as written. Inline code holding one becomes an
    HTML <code> element that shows it. Code blocks keep every character, behind a fence that no line inside can
    close, at the left margin where no list or quote can take it in. The text is first tidied as Gradio tidies a
    chat message (inspect.cleandoc), so that Gradio changes nothing more.
    """
    lines = _LINES.split(inspect.cleandoc(text))
    shown, i = [], 0
    while i < len(lines):
        opening = _FENCE.fullmatch(lines[i].rstrip("\r\n"))
        if not opening:
            shown.append(_shown_line(lines[i]))
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf" {{0,3}}{re.escape(fence)}{re.escape(fence[0])}* *")
        end = next((j for j in range(i + 1, len(lines)) if closing.fullmatch(lines[j].rstrip("\r\n"))), len(lines))
        code = "".join(line[min(indent, len(line) - len(line.lstrip(" "))) :] for line in lines[i + 1 : end])
        ends = (_line_end(lines[i]) or "\n", _line_end(lines[end]) if end < len(lines) else "")
        shown.append(_code_block(code, fence[0], opening["info"], ends))
        i = end + 1
    return "".join(shown)


def _shown_line(line: str) -> str:
    """A line outside code blocks, with nothing left in it that loads: its inline code spans are kept when harmless."""
    pieces, done = [], 0
    for span in _CODE_SPAN.finditer(line):
        pieces += [_escaped(line[done : span.start()]), _inline_code(span[2]) if _LOADER.search(span[0]) else span[0]]
        done = span.end()
    return "".join(pieces) + _escaped(line[done:])


def _escaped(text: str) -> str:
    """Markdown text with its tags, images and diagrams shown as written instead."""
    # An entity, not a backslash: a bare URL just before a tag would take the backslash into the link.
    text = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)
    return text.replace("![", "!\\[").replace("```mermaid", "``\\`mermaid")


def _inline_code(code: str) -> str:
    """Inline code as an HTML <code> element whose text is the code as written, not Markdown nor HTML."""
    if code.startswith(" ") and code.endswith(" ") and code.strip(" "):
        code = code[1:-1]  # as CommonMark strips a code span
    # Every ASCII punctuation character escaped: "&" and "<" as HTML entities, the rest with a backslash.
    return "<code>" + re.sub(r"[!-/:-@\[-`{-~]", lambda m: _ENTITIES.get(m[0], "\\" + m[0]), code) + "</code>"


_ENTITIES = {"&": "&amp;", "<": "&lt;"}


def _code_block(code: str, char: str, info: str, ends: tuple[str, str]) -> str:
    """Code behind a fence of `char` longer than any run of it inside; `ends`: the fence lines' line ends."""
    fence = char * max(3, 1 + max((len(run) for run in re.findall(f"{re.escape(char)}+", code)), default=0))
    if info.split()[:1] == ["mermaid"]:
        info = ""  # shown as code, not drawn
    if code and not code.endswith(("\n", "\r")):
        code += "\n"
    return f"{fence}{info}{ends[0]}{code}{fence}{ends[1]}"


def _line_end(line: str) -> str:
    return line[len(line.rstrip("\r\n")) :]


def _examples(choices: dict[str, LlamaAdapterModel], default: str) -> list[list]:
    """[message, adapter] rows: the text examples for `default`, the image ones for the first adapter that sees."""
    text = [
        "Give three tips for staying healthy.",
        "Write a haiku about the sea.",
        "Explain in two sentences what a neural network is.",
    ]
    examples = [[{"text": t, "files": []}, default] for t in text]
    seeing = next((label for label, model in choices.items() if model.multimodal), None)
    if seeing is not None:  # a page with no adapter that sees shows no image examples
        examples += [
            [{"text": question_instruction(synthetic.QUESTION, options), "files": [str(EXAMPLES / name)]}, seeing]
            for name, options in IMAGE_EXAMPLES.items()
        ]
    return examples
