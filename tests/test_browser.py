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
    import experts_report

    final = make_tiny_checkpoint(tmp_path_factory.mktemp("browser"), max_position_embeddings=1024)
    experts_report.write_report(final)
    demo, url = serve(final)
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
    assert "Expert load: " in page.locator("#heatmap").inner_text()

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

    # the About tab shows the architecture, training summary, limits, serving dtype and training plot
    open_tab(page, "About")
    about = page.locator("#about-text")
    about.wait_for(state="visible")
    text = about.inner_text()
    assert "active" in text and "Honest limits" in text and "validation loss 3.5678" in text
    assert "Weights in" in text and "start-up probe" in text
    page.locator("#training-plot img").wait_for(state="visible")
    page.wait_for_timeout(300)
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


def open_page(p, url, width=1280, height=1000):
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(30_000)
    page.goto(url)
    page.locator("#prompt textarea").wait_for()
    return browser, page


def open_tab(page, name):
    """Click a tab; on a phone Gradio moves the tabs that do not fit into its "More tabs" menu."""
    page.locator("#tabs [role=tab]").first.wait_for()
    tab = page.locator("#tabs [role=tab]", has_text=name)
    if tab.count() and tab.first.is_visible():
        tab.first.click()
    else:
        page.locator('#tabs button[aria-label="More tabs"]').click()
        page.locator("#tabs .overflow-dropdown button", has_text=name).click()


def in_view(page, selector) -> bool:
    return page.evaluate(f"""() => {{
      const r = document.querySelector('{selector}').getBoundingClientRect();
      return r.top >= 0 && r.top < window.innerHeight - 40 && r.height > 0;
    }}""")


def test_phone_layout(page_url):
    """At 390 x 844: the output is in view once Generate is pressed, the heatmap title fits the plot, and the About
    table does not break words in the middle."""
    with sync_api.sync_playwright() as p:
        browser, page = open_page(p, page_url[1], 390, 844)
        try:
            page.locator("#prompt textarea").fill("Photosynthesis is the process by which")
            page.locator("#generate").scroll_into_view_if_needed()
            page.locator("#generate").click()
            page.wait_for_function("() => document.querySelector('#output textarea').value.length > 0")
            assert in_view(page, "#output"), "the output box is out of view after pressing Generate"
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')",
                                   timeout=120_000)
            page.locator("#heatmap .js-plotly-plot").first.scroll_into_view_if_needed()
            page.locator("#heatmap .gtitle").first.wait_for()
            fits = page.evaluate("""() => {
              const plot = document.querySelector('#heatmap .main-svg').getBoundingClientRect();
              return [...document.querySelectorAll('#heatmap .gtitle')].every(t => {
                const r = t.getBoundingClientRect();
                return r.left >= plot.left - 1 && r.right <= plot.right + 1 && r.width > 0;
              });
            }""")
            assert fits, "the heatmap title is cut"
            os.makedirs(os.path.join(ROOT, "artifacts"), exist_ok=True)
            page.screenshot(path=os.path.join(ROOT, "artifacts", "browser_phone.png"), full_page=True)

            open_tab(page, "About")
            page.locator("#about-text table").first.wait_for()
            broken = page.evaluate(r"""() => {
              const broken = [];
              for (const cell of document.querySelectorAll('#about-text td, #about-text th')) {
                const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
                for (let node = walker.nextNode(); node; node = walker.nextNode()) {
                  const re = /[^\s\-\u2013\u2014\/]+/g; let m;  // a break after a hyphen or slash is fine
                  while ((m = re.exec(node.data))) {
                    const range = document.createRange();
                    range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
                    const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
                    if (tops.size > 1) broken.push(m[0]);
                  }
                }
              }
              return broken;
            }""")
            assert not broken, f"words broken across lines: {broken}"
        finally:
            browser.close()


def test_two_clicks_in_one_tick_start_one_stream(page_url, page):
    engine = page_url[0].engine
    page.locator("#prompt textarea").fill("Two clicks")
    before = engine.streams_started
    page.evaluate("() => { const b = document.querySelector('#generate'); b.click(); b.click(); }")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')", timeout=120_000)
    page.wait_for_timeout(500)
    assert engine.streams_started - before == 1


def test_chat_in_the_browser(page_url, page):
    """The Chat tab: send with Enter, the box empties, the reply streams in with its routing beside it."""
    open_tab(page, "Chat")
    box = page.locator("#chat-input textarea")
    box.fill("What do plants need to grow?")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#chat-status').innerText.includes('Done')",
                           timeout=120_000)
    assert box.input_value() == ""
    bubbles = page.locator("#chatbot .message")
    assert bubbles.count() >= 2
    assert "What do plants need to grow?" in page.locator("#chatbot").inner_text()
    assert page.locator("#chat-routing-view span.tok").count() > 0
    assert "base model" in page.locator("#chat-limits").inner_text()
    page.screenshot(path=os.path.join(ROOT, "artifacts", "browser_chat.png"), full_page=True)


def test_experts_tab_in_the_browser(page_url, page):
    """The Experts tab: one card per routed expert for the chosen layer (the report made by experts_report.py)."""
    demo = page_url[0]
    open_tab(page, "Experts")
    cards = page.locator("#experts-view .expert-card")
    cards.first.wait_for()
    assert cards.count() == demo.engine.model.config.n_routed_experts
    last = demo.engine.moe_layers[-1]
    page.locator("#experts-layer input").click()
    page.get_by_role("option", name=f"layer {last}").click()
    page.wait_for_function(f"() => document.querySelector('#experts-grid').getAttribute('data-layer') === '{last}'")
    page.screenshot(path=os.path.join(ROOT, "artifacts", "browser_experts.png"), full_page=True)


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
