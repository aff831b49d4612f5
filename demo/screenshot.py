"""Take the README's screenshot of the demo: a real conversation in headless Chromium, saved as docs/demo.png.

    python demo/screenshot.py --adapter runs/alpaca_smollm2 runs/synthetic_colours/multimodal

Serves the demo on the embedded model with those adapters, asks the first one a question, then switches to the
last one and asks about a bundled example image (with a multimodal adapter) before taking the picture.
"""

import argparse
import socket
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from llama_adapter.config import DemoConfig, ModelConfig
from llama_adapter.demo import COLOUR_QUESTION, EXAMPLES, build_app, launch, load_choices

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", nargs="+", required=True, help="adapter folders; the last one gets the image")
    parser.add_argument("--question", default="Give three tips for staying healthy.")
    parser.add_argument("--out", default=str(REPO / "docs" / "demo.png"))
    args = parser.parse_args()

    choices = load_choices(ModelConfig(), tuple(args.adapter))
    app = build_app(choices)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch(app, DemoConfig(port=port), block=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app.local_url)
        ask(page, args.question, answers=1)
        page.locator("#adapter input").click()
        page.get_by_role("option", name=args.adapter[-1]).click()
        image = EXAMPLES / "red-circle.png" if choices[args.adapter[-1]].multimodal else None
        ask(page, COLOUR_QUESTION, answers=2, image=image)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    app.close()
    print(f"wrote {args.out}")


def ask(page, text: str, answers: int, image: Path | None = None) -> None:
    """Send a message and wait until the answer has stopped growing."""
    if image is not None:
        page.locator("#message input[type=file]").set_input_files(str(image))
        page.locator("#message img").first.wait_for()
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")
    bots = page.locator("#conversation [data-testid=bot]")
    last, still = "", 0
    while still < 20:  # two seconds without change
        time.sleep(0.1)
        current = bots.nth(answers - 1).inner_text() if bots.count() >= answers else ""
        still = still + 1 if current and current == last else 0
        last = current


if __name__ == "__main__":
    main()
