"""The demo in a real browser: Debian's headless Chromium driven by Playwright (no browser is ever downloaded)."""

import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import no_step_for
from test_demo import expected, squash

from llama_adapter.data import synthetic
from llama_adapter.data.templates import format_prompt
from llama_adapter.evaluation.scienceqa import question_instruction
from llama_adapter.serving import demo

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
    steps = []
    slow = model.base.register_forward_hook(lambda *args: steps.append(time.sleep(0.05)))
    try:
        send(page, "Go on.")
        bot_messages(page).first.wait_for()
        deadline = time.time() + 30
        while len(squash(bot_messages(page).last.inner_text())) < 6 and time.time() < deadline:
            time.sleep(0.02)
        page.locator("#stop").click()
        deadline = time.time() + 10
        while not (ended := no_step_for(steps, 0.4)) and time.time() < deadline:
            pass
        assert ended, "generation went on after Stop"
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


# TEST-NET-2 (RFC 5737): an address for documentation that is never routed, so a request to it cannot reach anyone.
OUTSIDE = "http://198.51.100.7"


def external_references(tag: str) -> str:
    """Markdown and HTML that a browser would fetch from OUTSIDE, each at a path naming its kind."""
    url = f"{OUTSIDE}/{tag}"
    return "\n\n".join(
        [
            f"A picture: ![chart]({url}-markdown.png) and ![ref][pic]\n\n[pic]: {url}-reference.png",
            f'<img src="{url}-img.png" alt="img">',
            f"A bare link right before a tag: {url}-page<img src={url}-after-link.png>",
            f'<video src="{url}-video.mp4" poster="{url}-poster.png" preload="auto"></video>',
            f'<audio src="{url}-audio.mp3" preload="auto"></audio>',
            f'<iframe src="{url}-iframe.html"></iframe>',
            f'<div style="background-image: url({url}-css.png)">styled</div>',
            f'<picture><source srcset="{url}-srcset.png"><img alt="p"></picture>',
            f'<table background="{url}-table.png"><tr><td>cell</td></tr></table>',
            f'<svg width="8" height="8"><image href="{url}-svg.png" width="8" height="8"/></svg>',
            f'<input type="image" src="{url}-input.png">',
            f"Inline code: `<img src={url}-inline-code.png>`",
            "Code stays code: `a < b` and\n\n```\nif a < b and x<y:\n    pass\n```\n\n- one\n- two",
        ]
    )


def answer_with_markup(monkeypatch) -> None:
    """The model's answer holds markup as well, as one talked into writing it would; streamed 40 characters a go."""
    from llama_adapter.serving import demo

    answer = external_references("answer") + "\n\nEnd of answer."
    pieces = (answer[i : i + 40] for i in range(0, len(answer), 40))
    monkeypatch.setattr(demo, "stream_conversation", lambda *args: (pieces, 0))


def requests_outside(page, served) -> dict[str, str | None]:
    """Every request the page makes beyond the demo from now on: url -> why it failed (None: it did not)."""
    own = urlsplit(served.url).netloc
    outside = {}
    page.on("request", lambda r: outside.setdefault(r.url, None) if urlsplit(r.url).netloc not in (own, "") else None)
    page.on("requestfailed", lambda r: outside.update({r.url: r.failure}) if r.url in outside else None)
    # Abort each at once (recorded all the same), so that none waits on an address that never answers.
    page.route(lambda url: urlsplit(url).netloc not in (own, ""), lambda route: route.abort())
    return outside


def test_images_and_html_in_messages_and_answers_fetch_nothing_from_elsewhere(page, served, monkeypatch):
    answer_with_markup(monkeypatch)
    outside = requests_outside(page, served)
    send(page, external_references("message"))
    bot_messages(page).first.get_by_text("End of answer.").wait_for(timeout=15_000)
    page.wait_for_timeout(1000)  # media elements may start loading a moment after they are inserted
    assert list(outside) == [], f"the page fetched from outside the demo: {list(outside)}"
    # All of it is shown, as text: the code keeps its "<", the list its items.
    shown = page.locator("#conversation").inner_text()
    assert "a < b" in shown and "if a < b and x<y:" in shown and f'<img src="{OUTSIDE}/answer-img.png"' in shown
    assert f"<img src={OUTSIDE}/message-inline-code.png>" in shown
    assert page.locator("#conversation li").count() == 4  # "- one", "- two" of the message and of the answer


def test_the_page_itself_refuses_what_would_fetch_from_elsewhere(page, served, monkeypatch):
    """The second guard: were markup to reach the page (here safe_markdown is turned off), the browser refuses it."""
    from llama_adapter.serving import demo

    monkeypatch.setattr(demo, "safe_markdown", lambda text: text)
    answer_with_markup(monkeypatch)
    outside = requests_outside(page, served)
    send(page, external_references("message"))
    bot_messages(page).first.get_by_text("End of answer.").wait_for(timeout=15_000)
    page.wait_for_timeout(1000)
    assert f"{OUTSIDE}/message-img.png" in outside and f"{OUTSIDE}/answer-img.png" in outside  # tried, then:
    assert {url: why for url, why in outside.items() if why != "csp"} == {}, "not refused by the page's policy"


def test_the_page_opens_with_alpaca_and_an_image_example_switches_to_shapes(browser, shelf_served):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(shelf_served.url)
    page.locator("#message textarea").wait_for()
    chooser = page.locator("#adapter input")
    assert chooser.input_value() == "alpaca"
    set_max_new_tokens(page, NEW)
    page.locator("#examples tr.tr-body").filter(has=page.locator("img")).first.click()
    page.locator("#message img").first.wait_for()  # the example's image, attached
    deadline = time.time() + 10
    while chooser.input_value() != "shapes" and time.time() < deadline:
        time.sleep(0.05)
    assert chooser.input_value() == "shapes"
    page.locator("#message textarea").press("Enter")
    name, options = next(iter(demo.IMAGE_EXAMPLES.items()))
    prompt = format_prompt(question_instruction(synthetic.QUESTION, options))
    wait_for_answer(page, 1, expected(shelf_served.choices["shapes"], prompt, str(demo.EXAMPLES / name)))
    page.close()
