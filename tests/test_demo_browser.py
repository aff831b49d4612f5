"""The demo in a real browser: Debian's headless Chromium driven by Playwright (no browser is ever downloaded)."""

import threading
import time
from pathlib import Path

import pytest
from test_demo import expected, squash

from llama_adapter.data import format_prompt
from llama_adapter.generation import WORKER_NAME

CHROMIUM = Path("/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the [test] extra)")
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} not found: apt-get install chromium (scripts/setup.sh does where it may)", allow_module_level=True
    )

pytestmark = pytest.mark.slow  # a real server and browser: seconds per test, not milliseconds

NEW = 12  # as test_demo's expected() answers by default


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to run as root, which CI containers often are.
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(served.url)
    page.locator("#message textarea").wait_for()
    yield page
    page.close()


def set_max_new_tokens(page, value: int) -> None:
    box = page.get_by_label("Max new tokens", exact=False).locator("xpath=..").locator("input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def send(page, text: str, image: Path | None = None) -> None:
    if image is not None:
        page.locator("#message input[type=file]").set_input_files(str(image))
        page.locator("#message img").first.wait_for()  # the attachment's preview
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def bot_messages(page):
    return page.locator("#conversation [data-testid=bot]")


def wait_for_answer(page, count: int, want: str, timeout=30.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        bots = bot_messages(page)
        if bots.count() >= count and squash(bots.nth(count - 1).inner_text()) == want:
            return want
        time.sleep(0.05)
    raise AssertionError(f"no answer {want!r}; the page shows {[b.inner_text() for b in bot_messages(page).all()]}")


def test_type_a_message_and_watch_the_answer_stream_in(page, served, tmp_path):
    model = served.choices[served.text]
    set_max_new_tokens(page, 40)
    want = expected(model, format_prompt("Name a colour."), max_new_tokens=40)
    slow = model.base.register_forward_hook(lambda *args: time.sleep(0.04))  # about 2 s: slow enough to watch
    try:
        send(page, "Name a colour.")
        seen = set()
        deadline = time.time() + 30
        while time.time() < deadline and want not in seen:
            bots = bot_messages(page)
            if bots.count():
                seen.add(squash(bots.last.inner_text()))
            time.sleep(0.02)
    finally:
        slow.remove()
    growing = sorted((s for s in seen if s), key=len)
    assert growing[-1] == want
    assert len(growing) >= 3 and all(want.startswith(s) for s in growing), growing
    assert page.locator("#conversation [data-testid=user]").first.inner_text().strip() == "Name a colour."
    assert page.locator("#message textarea").input_value() == ""  # the box is cleared for the next message
    page.screenshot(path=str(tmp_path / "text-turn.png"))
    assert (tmp_path / "text-turn.png").stat().st_size > 10_000


def test_upload_an_image_and_ask_about_it(page, served, tmp_path):
    from PIL import Image

    image = tmp_path / "shape.png"
    Image.new("RGB", (48, 48), (30, 60, 210)).save(image)
    page.locator("#adapter input").click()
    page.get_by_role("option", name=served.visual).click()
    page.get_by_text("CLIP", exact=False).first.wait_for()  # the panel describes the chosen adapter
    set_max_new_tokens(page, NEW)
    send(page, "What colour is the shape?", image)
    want = expected(served.choices[served.visual], format_prompt("What colour is the shape?"), str(image))
    wait_for_answer(page, 1, want)
    assert page.locator("#conversation img").count() >= 1  # the thumbnail in the conversation
    page.screenshot(path=str(tmp_path / "image-turn.png"))


def test_stop_button_stops_the_answer(page, served):
    model = served.choices[served.text]
    set_max_new_tokens(page, 100)
    slow = model.base.register_forward_hook(lambda *args: time.sleep(0.05))
    try:
        send(page, "Go on.")
        bot_messages(page).first.wait_for()
        deadline = time.time() + 30
        while len(squash(bot_messages(page).last.inner_text())) < 6 and time.time() < deadline:
            time.sleep(0.02)
        page.locator("#stop").click()
        deadline = time.time() + 10
        while any(t.name == WORKER_NAME for t in threading.enumerate()) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(t.name == WORKER_NAME for t in threading.enumerate()), "generation went on after Stop"
        stopped = squash(bot_messages(page).last.inner_text())
        time.sleep(1.0)
        assert squash(bot_messages(page).last.inner_text()) == stopped
        assert 0 < len(stopped) < 90  # far from the 100 characters asked for
    finally:
        slow.remove()


def test_a_file_that_is_not_an_image_gets_a_message_not_a_trace(page, served, tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_text("these are not pixels")
    set_max_new_tokens(page, NEW)
    send(page, "What is this?", None)
    wait_for_answer(page, 1, expected(served.choices[served.text], format_prompt("What is this?")))
    page.locator("#message input[type=file]").set_input_files(str(fake))
    page.locator("#message textarea").fill("And this?")
    page.locator("#message textarea").press("Enter")
    toast = page.get_by_text("photo.png cannot be used as an image", exact=False)
    toast.first.wait_for(timeout=15_000)
    assert "Traceback" not in page.content()
    assert bot_messages(page).count() == 1  # nothing was added to the conversation
