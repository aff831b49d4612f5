"""Take the README's screenshot of the demo: a real conversation in headless Chromium, saved as docs/demo.png.

    python demo/screenshot.py

Serves the demo as `llama-adapter demo` does with no flags (the embedded model and the shelf's adapters), asks the
adapter it opens with a question, then clicks the first image example, which selects the adapter that sees, sends it
and takes the picture once both answers are complete.
"""

import argparse
import socket
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from llama_adapter.config import DemoConfig, ModelConfig
from llama_adapter.serving.demo import build_app, launch, load_choices

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default="Give three tips for staying healthy.")
    parser.add_argument("--out", default=str(REPO / "docs" / "demo.png"))
    args = parser.parse_args()

    app = build_app(load_choices(ModelConfig(), ()))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch(app, DemoConfig(port=port), block=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app.local_url)
        page.locator("#message textarea").fill(args.question)
        page.locator("#message textarea").press("Enter")
        wait_until_still(page, answers=1)
        page.locator("#examples tr.tr-body").filter(has=page.locator("img")).first.click()  # the first image example
        page.locator("#message img").first.wait_for()
        page.locator("#message textarea").press("Enter")
        wait_until_still(page, answers=2)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    app.close()
    print(f"wrote {args.out}")


def wait_until_still(page, answers: int) -> None:
    """Wait until the `answers`-th answer has stopped growing."""
    bots = page.locator("#conversation [data-testid=bot]")
    last, still = "", 0
    while still < 20:  # two seconds without change
        time.sleep(0.1)
        current = bots.nth(answers - 1).inner_text() if bots.count() >= answers else ""
        still = still + 1 if current and current == last else 0
        last = current


if __name__ == "__main__":
    main()
