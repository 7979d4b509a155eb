"""The README's screenshots of the Space: the Complete tab after a generation, on a laptop (1366 x 900) and on a phone
(390 x 844), from the served checkpoint (MODEL_DIR, else checkpoints/final) in headless chromium.

    python3 docs/screenshots.py                 # -> docs/space-desktop.png, docs/space-phone.png
    python3 docs/screenshots.py --all           # also every tab at both sizes -> artifacts/screens/space-*.png

Needs the playwright Python package and chromium (Debian: apt-get install chromium; or set CHROMIUM). The PNGs are
reduced to a 256-colour palette so each stays well under 300 KB. Every wait is on a state of the page.
"""
import argparse
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIZES = {"desktop": (1366, 900), "phone": (390, 844)}
PROMPT = "Photosynthesis is the process by which"
TIMEOUT_MS = 600_000


def small_png(path: str) -> int:
    """Rewrite a screenshot with a 256-colour palette (text and flat colours survive it); returns its size."""
    from PIL import Image

    with Image.open(path) as img:
        img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return os.path.getsize(path)


def open_tab(page, name):
    """Click a tab; on a phone Gradio moves the tabs that do not fit into its "More tabs" menu (tests/test_browser.py
    uses this too)."""
    page.locator("#tabs [role=tab]").first.wait_for()
    tab = page.locator("#tabs [role=tab]", has_text=name)
    if tab.count() and tab.first.is_visible():
        tab.first.click()
    else:
        page.locator('#tabs button[aria-label="More tabs"]').click()
        page.locator("#tabs .overflow-dropdown button", has_text=name).click()
    page.locator(f"#tab-{name.lower()}").wait_for(state="visible")  # its panel is shown


def shoot(browser, url, size, out_dir, every_tab):
    width, height = SIZES[size]
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(url)
        page.locator("#prompt textarea").wait_for(state="visible")
        page.locator("#prompt textarea").fill(PROMPT)
        temp = page.locator("#temperature input[type=number]")
        temp.fill("0")  # greedy: the same text every time
        temp.press("Tab")
        page.locator("#generate").click()
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
        page.locator("#heatmap .js-plotly-plot").first.wait_for()
        if size == "desktop":  # the prompt, the continuation and the coloured routing in one view
            page.evaluate("() => document.querySelector('#tabs').scrollIntoView({block: 'start'})")
        path = os.path.join(HERE, f"space-{size}.png")
        page.screenshot(path=path)
        print(f"{path}: {small_png(path) / 1024:.0f} KB")
        if every_tab:
            os.makedirs(out_dir, exist_ok=True)
            for tab in ["Complete", "Chat", "Experts", "About"]:
                open_tab(page, tab)
                if tab == "Chat":
                    page.locator("#chat-input textarea").fill("What do plants need to grow?")
                    page.locator("#chat-input textarea").press("Enter")
                    page.wait_for_function("() => document.querySelector('#chat-status').innerText.includes('Done')")
                path = os.path.join(out_dir, f"space-{tab.lower()}-{size}.png")
                page.screenshot(path=path, full_page=True)
                print(path)
    finally:
        context.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="checkpoint to serve (default: MODEL_DIR, else checkpoints/final)")
    parser.add_argument("--all", action="store_true", help="also every tab at both sizes, full page")
    parser.add_argument("--out", default=os.path.join(ROOT, "artifacts", "screens"), help="where --all writes")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    import app

    demo = app.build_demo(args.model_dir)
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                for size in SIZES:
                    shoot(browser, f"http://127.0.0.1:{port}/", size, args.out, args.all)
            finally:
                browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
