"""app.py in a real browser (Debian's chromium through Playwright): type, move sliders, generate, see it stream.

Saves artifacts/browser.png. Skips when chromium, Playwright or ../shared/tokenizer is missing; no network.
"""
import os
import shutil

import pytest

from conftest import ROOT, free_port, make_tiny_checkpoint
from test_app import app, serve  # (skips without the tokenizer)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no chromium at {CHROMIUM} (Debian package `chromium`; or set CHROMIUM)", allow_module_level=True)

# Samples the output box and the routing view every 5 ms inside the page, so no streamed value is missed.
RECORDER = """() => {
  window.__seen = []; window.__views = [];
  window.__timer = setInterval(() => {
    const out = document.querySelector('#output textarea');
    const v = out ? out.value : '';
    if (v && window.__seen[window.__seen.length - 1] !== v) window.__seen.push(v);
    const n = document.querySelectorAll('#routing-tokens span.tok').length;
    if (window.__views[window.__views.length - 1] !== n) window.__views.push(n);
  }, 5);
}"""


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    # a 1024-token context allows 512 new tokens: a long enough stream to press Stop in the middle of
    demo, url = serve(make_tiny_checkpoint(tmp_path_factory.mktemp("browser"), max_position_embeddings=1024))
    yield demo, url
    demo.close()


@pytest.fixture
def page(page_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(page_url[1])
            yield page
        finally:
            browser.close()


def test_generate_streams_in_the_browser(page_url, page):
    demo = page_url[0]
    prompt = page.locator("#prompt textarea")
    prompt.wait_for()
    assert "Generate some text" in page.locator("#routing-view").inner_text()
    prompt.fill("Photosynthesis is the process by which")

    # temperature: type 0 into the slider's number box (greedy)
    temp = page.locator("#temperature input[type=number]")
    temp.fill("0")
    temp.press("Tab")
    # max new tokens: drag by keyboard to the bottom of the range (Home), then 39 steps up
    tokens = page.locator("#max-new-tokens input[type=range]")
    tokens.focus()
    tokens.press("Home")
    for _ in range(39):
        tokens.press("ArrowRight")
    wanted = 40
    assert page.locator("#max-new-tokens input[type=number]").input_value() == str(wanted)

    page.evaluate(RECORDER)
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')",
                           timeout=120_000)
    page.wait_for_timeout(200)
    seen = page.evaluate("() => { clearInterval(window.__timer); return window.__seen; }")
    views = page.evaluate("() => window.__views")
    status = page.locator("#status").inner_text()

    # the values the sliders were moved to reached the server
    assert "greedy" in status and f"max {wanted} new tokens" in status, status
    final = page.locator("#output textarea").input_value()
    assert final and seen[-1] == final
    intermediate = [v for v in seen[:-1] if v]
    assert len(set(intermediate)) >= 2, f"no streaming seen: {seen}"
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]) if b != final)
    # the routing view followed the stream and ends with one coloured span per generated token
    counts = [int(n) for n in views]
    assert len(set(counts)) >= 3 and counts == sorted(counts), views
    spans = page.locator("#routing-tokens span.tok[data-expert]")
    assert spans.count() == counts[-1] > 0
    title = spans.first.get_attribute("title")
    assert all(f"layer {layer}:" in title for layer in demo.engine.moe_layers)
    page.locator("#heatmap .js-plotly-plot").first.wait_for()
    assert "Expert load over" in page.locator("#heatmap").inner_text()

    # switching the layer recolours the same tokens
    before = page.locator("#routing-tokens").get_attribute("data-layer")
    page.locator("#layer input").click()
    last = demo.engine.moe_layers[-1]
    page.get_by_role("option", name=f"layer {last}").click()
    page.wait_for_function(f"() => document.querySelector('#routing-tokens')"
                           f".getAttribute('data-layer') === '{last}'")
    assert before != str(last)
    assert page.locator("#routing-tokens span.tok[data-expert]").count() == counts[-1]

    os.makedirs(os.path.join(ROOT, "artifacts"), exist_ok=True)
    page.screenshot(path=os.path.join(ROOT, "artifacts", "browser.png"), full_page=True)

    # the About panel opens on the architecture, training summary, limits and training plot
    page.locator("#about").get_by_text("About this model").click()
    about = page.locator("#about-text")
    about.wait_for(state="visible")
    text = about.inner_text()
    assert "active" in text and "Honest limits" in text and "validation loss 3.5678" in text
    page.locator("#training-plot img").wait_for(state="visible")
    page.wait_for_timeout(500)  # let the accordion finish opening
    page.screenshot(path=os.path.join(ROOT, "artifacts", "browser_about.png"), full_page=True)


def test_stop_and_clear_in_the_browser(page_url, page):
    limit = page_url[0].engine.max_new_limit
    page.locator("#prompt textarea").fill("The law of demand states that")
    tokens = page.locator("#max-new-tokens input[type=range]")
    tokens.focus()
    tokens.press("End")
    assert page.locator("#max-new-tokens input[type=number]").input_value() == str(limit)
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelectorAll('#routing-tokens span.tok').length >= 3")
    page.locator("#stop").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Stop button')")
    spans = page.locator("#routing-tokens span.tok")
    n = spans.count()
    page.wait_for_timeout(1000)
    assert spans.count() == n < limit  # the stream really ended, well before max new tokens
    assert f"{n} tokens" in page.locator("#status").inner_text()

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === ''")
    assert page.locator("#output textarea").input_value() == ""
    assert spans.count() == 0 and "Generate some text" in page.locator("#routing-view").inner_text()
    assert page.locator("#status").inner_text().strip() == "Ready."


def test_missing_checkpoint_page_in_the_browser(tmp_path):
    demo = app.build_demo(str(tmp_path / "no-such-checkpoint"))
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               ssr_mode=False)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                panel = page.locator("#load-error")
                panel.wait_for(timeout=30_000)
                assert "No model loaded" in panel.inner_text() and "no config.json" in panel.inner_text()
                assert page.locator("#generate").is_disabled()
            finally:
                browser.close()
    finally:
        demo.close()
