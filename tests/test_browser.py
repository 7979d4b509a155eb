"""app.py in a real browser (Debian's chromium through Playwright): type, move sliders, generate, see it stream; every
tab's layout at a laptop's 1366 x 900 and a phone's 390 x 844.

Every wait is on a state (the page loaded, a status text, an element, the server idle), never on time: on a busy
machine a step may take many seconds, and a fixed sleep is either too short there or wasted elsewhere.
Saves screenshots to artifacts/ (artifacts/screens/<tab>-<size>.png). Without chromium, Playwright or
../shared/tokenizer every test here is skipped, and conftest.py ends the run with "BROWSER TESTS DID NOT RUN" and
the reason; no network.
"""
import importlib.util
import os
import shutil
import time

import pytest

from conftest import ROOT, free_port, make_tiny_checkpoint
from test_app import app, serve  # (skips without the tokenizer)

_spec = importlib.util.spec_from_file_location("screenshots", os.path.join(ROOT, "docs", "screenshots.py"))
screenshots = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screenshots)
open_tab = screenshots.open_tab  # the README's screenshots and these tests open tabs the same way

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed "
                               "(pip install -r requirements-dev.txt)")
if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium; or set CHROMIUM to a Chromium binary)",
                allow_module_level=True)

STATE_TIMEOUT_MS = 300_000  # an upper bound for a state to be reached on a very busy machine, not a pace
SIZES = {"desktop": (1366, 900), "phone": (390, 844)}
SCREENS = os.path.join(ROOT, "artifacts", "screens")

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

# What a visitor sees go wrong in a layout: tables or cards drawn over each other, a page that scrolls sideways,
# a button's or tab's label wrapped onto two lines, or cut
LAYOUT = r"""() => {
  const shown = el => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && el.offsetParent !== null && getComputedStyle(el).visibility !== 'hidden';
  };
  const name = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
    (el.dataset && el.dataset.expert ? '[E' + el.dataset.expert + ']' : '') +
    ' in ' + (el.closest('[id]') ? el.closest('[id]').id : '?');
  const boxes = [...document.querySelectorAll('table, .expert-card')].filter(shown);
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) {
    for (let j = i + 1; j < boxes.length; j++) {
      const a = boxes[i], b = boxes[j];
      if (a.contains(b) || b.contains(a)) continue;
      const r = a.getBoundingClientRect(), q = b.getBoundingClientRect();
      const w = Math.min(r.right, q.right) - Math.max(r.left, q.left);
      const h = Math.min(r.bottom, q.bottom) - Math.max(r.top, q.top);
      if (w > 1 && h > 1) overlaps.push(name(a) + ' / ' + name(b));
    }
  }
  const doc = document.scrollingElement;
  const wrapped = [];
  // the page's short labels: action buttons and tabs (example prompts and accordion headers are sentences and may
  // wrap on a phone)
  for (const b of [...document.querySelectorAll('.action-row button, #tabs [role=tab]')].filter(shown)) {
    const walker = document.createTreeWalker(b, NodeFilter.SHOW_TEXT);
    for (let t = walker.nextNode(); t; t = walker.nextNode()) {
      if (!t.data.trim()) continue;
      const range = document.createRange();
      range.selectNodeContents(t);
      const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
      if (tops.size > 1) wrapped.push(b.innerText.trim());
    }
    if (b.closest('.action-row') && b.scrollWidth > b.clientWidth + 1) wrapped.push(b.innerText.trim() + ' (cut)');
  }
  return {overlaps, sideways: doc.scrollWidth - doc.clientWidth, wrapped, boxes: boxes.length};
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


@pytest.fixture(scope="module")
def browser():
    """One chromium for the module (a launch per test is the slowest step on a busy machine); a fresh context, i.e.
    a fresh visitor session, per page."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def wait_until(condition, what: str, timeout_s: float = STATE_TIMEOUT_MS / 1000):
    """Poll a server-side state until it holds (every 20 ms); fail naming it when it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.02)


def server_idle(engine):
    wait_until(lambda: not engine.running and engine.admission.active == 0 and engine.admission.waiting == 0,
               "the server idle (no stream running or waiting)")


def open_page(browser, url, size="desktop"):
    """A new visitor's page, returned once the app has rendered and its Generate button is there."""
    width, height = SIZES[size] if isinstance(size, str) else size
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(STATE_TIMEOUT_MS)
    page.goto(url)
    page.locator("#prompt textarea").wait_for(state="visible")
    page.locator("#generate").wait_for(state="visible")
    page.locator("#tabs [role=tab]").first.wait_for(state="visible")
    return page


@pytest.fixture
def page(page_url, browser):
    server_idle(page_url[0].engine)  # a previous test's stream has ended
    page = open_page(browser, page_url[1])
    try:
        yield page
    finally:
        page.context.close()


def wait_status(page, selector, text):
    page.wait_for_function(f"() => (document.querySelector('{selector}') || {{}}).innerText?.includes('{text}')")


def set_max_tokens(page, n: int):
    """Type n into the max-new-tokens number box (a short stream keeps a run on a busy machine short)."""
    box = page.locator("#max-new-tokens input[type=number]")
    box.fill(str(n))
    box.press("Tab")
    page.wait_for_function(f"() => document.querySelector('#max-new-tokens input[type=range]').value === '{n}'")


def choose_layer(page, dropdown, layer):
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=f"layer {layer}").click()


def fully_in_view(page, selector) -> dict:
    return page.evaluate(f"""() => {{
      const r = document.querySelector('{selector}').getBoundingClientRect();
      return {{top: r.top, bottom: r.bottom, height: window.innerHeight,
               ok: r.top >= -1 && r.bottom <= window.innerHeight + 1 && r.height > 0}};  // (sub-pixel scroll)
    }}""")


def screenshot(page, name):
    os.makedirs(SCREENS, exist_ok=True)
    page.screenshot(path=os.path.join(SCREENS, f"{name}.png"), full_page=True)


def test_generate_streams_in_the_browser(page_url, page):
    demo = page_url[0]
    prompt = page.locator("#prompt textarea")
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
    page.wait_for_function(f"() => document.querySelector('#max-new-tokens input[type=number]').value === '{wanted}'")

    page.evaluate(RECORDER)
    page.locator("#generate").click()
    wait_status(page, "#status", "Done")
    # the recorder has seen the final value (it samples every 5 ms: wait for that state, not for time)
    page.wait_for_function("() => window.__seen.length > 0 && "
                           "window.__seen[window.__seen.length - 1] === document.querySelector('#output textarea').value")
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
    last = demo.engine.moe_layers[-1]
    choose_layer(page, "#layer", last)
    page.wait_for_function(f"() => document.querySelector('#routing-tokens')"
                           f".getAttribute('data-layer') === '{last}'")
    assert before != str(last)
    assert page.locator("#routing-tokens span.tok[data-expert]").count() == counts[-1]
    screenshot(page, "generate-desktop")

    # the About tab shows the architecture, training summary, limits, serving dtype and training plot
    open_tab(page, "About")
    about = page.locator("#about-text")
    about.wait_for(state="visible")
    text = about.inner_text()
    assert "active" in text and "Honest limits" in text and "validation loss 3.5678" in text
    assert "Weights in" in text and "start-up probe" in text
    page.locator("#training-plot img").wait_for(state="visible")


def test_stop_and_clear_in_the_browser(page_url, page):
    engine = page_url[0].engine
    limit = engine.max_new_limit
    page.locator("#prompt textarea").fill("The law of demand states that")
    tokens = page.locator("#max-new-tokens input[type=range]")
    tokens.focus()
    tokens.press("End")
    page.wait_for_function(f"() => document.querySelector('#max-new-tokens input[type=number]').value === '{limit}'")
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelectorAll('#routing-tokens span.tok').length >= 3")
    page.locator("#stop").click()
    wait_status(page, "#status", "Stop button")
    server_idle(engine)  # the stream has really ended on the server: nothing more can arrive
    spans = page.locator("#routing-tokens span.tok")
    n = spans.count()
    assert n < limit  # it ended well before max new tokens
    assert f"{n} tokens" in page.locator("#status").inner_text()

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === ''")
    page.wait_for_function("() => document.querySelector('#status').innerText.trim() === 'Ready.'")
    assert page.locator("#output textarea").input_value() == ""
    assert spans.count() == 0 and "Generate some text" in page.locator("#routing-view").inner_text()


def check_layout(page, where: str):
    found = page.evaluate(LAYOUT)
    assert not found["overlaps"], f"{where}: overlapping tables/cards: {found['overlaps']}"
    assert found["sideways"] <= 1, f"{where}: the page scrolls sideways by {found['sideways']} px"
    assert not found["wrapped"], f"{where}: button labels wrapped or cut: {found['wrapped']}"
    return found


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_every_tab_holds_its_layout(page_url, browser, size):
    """Issue 23 at 1366 x 900 and 390 x 844: in every tab no two visible tables or cards overlap, the page never
    scrolls sideways and no button label wraps; on Generate the streamed text is in view; a tapped token shows its
    routing; Chat shows plain text; the About plot fills its width. Screenshots: artifacts/screens/."""
    demo, url = page_url
    engine = demo.engine
    server_idle(engine)
    page = open_page(browser, url, size)
    try:
        check_layout(page, f"Complete {size}, before generating")
        set_max_tokens(page, 32)
        page.locator("#prompt textarea").fill("Photosynthesis is the process by which")
        page.locator("#generate").click()
        page.wait_for_function("() => document.querySelector('#output textarea').value.length > 0")
        where = fully_in_view(page, "#output")
        assert where["ok"], f"the streamed text is not in view after Generate: {where}"
        wait_status(page, "#status", "Done")
        page.locator("#heatmap .js-plotly-plot").first.wait_for()
        check_layout(page, f"Complete {size}")
        # tap (click) a token: its routing in every layer shows in a box (a phone cannot hover)
        token = page.locator("#routing-tokens span.tok").nth(2)
        token.scroll_into_view_if_needed()
        token.click()
        info = page.locator("#token-info")
        info.wait_for(state="visible")
        assert all(f"layer {layer}:" in info.inner_text() for layer in engine.moe_layers)
        box = info.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= SIZES[size][0] + 1, box
        screenshot(page, f"complete-{size}")
        page.locator("#title").click()  # a tap elsewhere closes it
        info.wait_for(state="detached")

        open_tab(page, "Chat")
        box = page.locator("#chat-input textarea")
        box.fill("- plants 1. water")
        box.press("Enter")
        wait_status(page, "#chat-status", "Done")
        page.locator("#chat-routing-view span.tok").first.wait_for()
        chat = page.locator("#chatbot")
        assert "- plants 1. water" in chat.inner_text()  # plain text, as in the routing view: no Markdown list
        assert chat.locator("li").count() == 0
        check_layout(page, f"Chat {size}")
        screenshot(page, f"chat-{size}")

        open_tab(page, "Experts")
        cards = page.locator("#experts-view .expert-card")
        cards.first.wait_for(state="visible")
        assert cards.count() == engine.model.config.n_routed_experts
        found = check_layout(page, f"Experts {size}")
        assert found["boxes"] >= 2 * cards.count()  # every card and its table were checked
        screenshot(page, f"experts-{size}")

        open_tab(page, "About")
        plot = page.locator("#training-plot img")
        plot.wait_for(state="visible")
        page.wait_for_function("() => document.querySelector('#training-plot img').complete")
        sizes = page.evaluate("""() => {
          const img = document.querySelector('#training-plot img').getBoundingClientRect();
          const box = document.querySelector('#training-plot').getBoundingClientRect();
          return {img_w: img.width, img_h: img.height, box_w: box.width, box_h: box.height};
        }""")
        assert sizes["img_w"] >= 0.9 * sizes["box_w"] and sizes["img_h"] >= 0.8 * sizes["box_h"] > 0, sizes
        check_layout(page, f"About {size}")
        screenshot(page, f"about-{size}")
    finally:
        page.context.close()


def test_phone_heatmap_title_fits_and_about_words_stay_whole(page_url, browser):
    """At 390 x 844 the heatmap title fits the plot, and the About table does not break words in the middle."""
    server_idle(page_url[0].engine)
    page = open_page(browser, page_url[1], "phone")
    try:
        set_max_tokens(page, 16)
        page.locator("#prompt textarea").fill("Photosynthesis is the process by which")
        page.locator("#generate").click()
        wait_status(page, "#status", "Done")
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
        page.context.close()


def test_two_clicks_in_one_tick_start_one_stream(page_url, page):
    engine = page_url[0].engine
    set_max_tokens(page, 8)
    page.locator("#prompt textarea").fill("Two clicks")
    before = engine.streams_started
    page.evaluate("() => { const b = document.querySelector('#generate'); b.click(); b.click(); }")
    wait_status(page, "#status", "Done")
    server_idle(engine)  # a second stream, had one been started, would have been counted by now
    assert engine.streams_started - before == 1


def test_each_tab_keeps_its_routing_layer_in_the_browser(page_url, page):
    """Issue 23: layer 3 picked in Complete, then a Chat message: Chat's dropdown said layer 1 while its view showed
    layer 3. Each tab's view follows its own dropdown."""
    layers = page_url[0].engine.moe_layers
    first, last = layers[0], layers[-1]
    set_max_tokens(page, 8)
    page.locator("#prompt textarea").fill("Energy is")
    page.locator("#generate").click()
    wait_status(page, "#status", "Done")
    choose_layer(page, "#layer", last)
    page.wait_for_function(f"() => document.querySelector('#routing-tokens').getAttribute('data-layer') === '{last}'")

    open_tab(page, "Chat")
    page.locator("#chat-input textarea").fill("Hello there")
    page.locator("#chat-input textarea").press("Enter")
    wait_status(page, "#chat-status", "Done")
    assert page.locator("#chat-layer input").input_value() == f"layer {first}"
    assert page.locator("#chat-routing-view #routing-tokens").get_attribute("data-layer") == str(first)
    choose_layer(page, "#chat-layer", last)
    page.wait_for_function(f"() => document.querySelector('#chat-routing-view #routing-tokens')"
                           f".getAttribute('data-layer') === '{last}'")

    open_tab(page, "Complete")
    choose_layer(page, "#layer", first)
    page.wait_for_function(f"() => document.querySelector('#routing-view #routing-tokens')"
                           f".getAttribute('data-layer') === '{first}'")
    page.locator("#generate").click()
    wait_status(page, "#status", "Done")
    assert page.locator("#routing-view #routing-tokens").get_attribute("data-layer") == str(first)
    open_tab(page, "Chat")  # Chat still shows the layer its own dropdown says
    assert page.locator("#chat-layer input").input_value() == f"layer {last}"
    assert page.locator("#chat-routing-view #routing-tokens").get_attribute("data-layer") == str(last)


def test_chat_in_the_browser(page_url, page):
    """The Chat tab: send with Enter, the box empties, the reply streams in with its routing beside it."""
    set_max_tokens(page, 16)
    open_tab(page, "Chat")
    box = page.locator("#chat-input textarea")
    box.fill("What do plants need to grow?")
    box.press("Enter")
    wait_status(page, "#chat-status", "Done")
    # the box is emptied by a separate browser-side event, which a loaded machine may run later: wait for it
    page.wait_for_function("() => document.querySelector('#chat-input textarea').value === ''")
    bubbles = page.locator("#chatbot .message")
    assert bubbles.count() >= 2
    assert "What do plants need to grow?" in page.locator("#chatbot").inner_text()
    assert page.locator("#chat-routing-view span.tok").count() > 0
    assert "base model" in page.locator("#chat-limits").inner_text()


def test_experts_tab_in_the_browser(page_url, page):
    """The Experts tab: one card per routed expert for the chosen layer (the report made by experts_report.py)."""
    demo = page_url[0]
    open_tab(page, "Experts")
    cards = page.locator("#experts-view .expert-card")
    cards.first.wait_for()
    assert cards.count() == demo.engine.model.config.n_routed_experts
    last = demo.engine.moe_layers[-1]
    choose_layer(page, "#experts-layer", last)
    page.wait_for_function(f"() => document.querySelector('#experts-grid').getAttribute('data-layer') === '{last}'")


def test_missing_checkpoint_page_in_the_browser(tmp_path, browser):
    demo = app.build_demo(str(tmp_path / "no-such-checkpoint"))
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               ssr_mode=False)
    try:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(STATE_TIMEOUT_MS)
            page.goto(f"http://127.0.0.1:{port}/")
            panel = page.locator("#load-error")
            panel.wait_for()
            assert "No model loaded" in panel.inner_text() and "no config.json" in panel.inner_text()
            page.locator("#generate").wait_for()
            assert page.locator("#generate").is_disabled()
        finally:
            context.close()
    finally:
        demo.close()
