#!/usr/bin/env python
"""The README's picture of the demo (docs/demo.png): the demo on the embedded pipelines (with the CoDe refiner), in a
headless Chromium driven by Playwright, after one generation in the VAR tab.

    pip install -e ".[demo,test]" && apt-get install -y chromium
    python scripts/demo_screenshot.py --out docs/demo.png

Uses the system's Chromium (``--chromium``, default /usr/bin/chromium); no browser is downloaded.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers_var.demo import FAMILIES, build_demo  # noqa: E402
from diffusers_var.embedded_models import embedded_pipeline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/demo.png", help="where the PNG goes (default docs/demo.png)")
    parser.add_argument("--chromium", default=os.environ.get("DIFFUSERS_VAR_CHROMIUM", "/usr/bin/chromium"))
    parser.add_argument("--class-name", default="blue square on yellow", help="the VAR tab's class")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    demo = build_demo(
        var=FAMILIES["var"][2], device="cpu", max_images=8, var_refiner=embedded_pipeline("var-shapes-refiner")
    )
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=args.chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
            page.set_default_timeout(120_000)
            page.goto(demo.local_url)
            page.wait_for_selector("#var-generate", state="visible")
            page.locator("#var-class input").click()
            page.locator("#var-class input").fill(args.class_name)
            page.get_by_role("option", name=args.class_name, exact=True).click()
            page.locator("#var-num-images input[type=number]").fill("8")
            page.locator("#var-randomize input").uncheck()
            page.locator("#var-seed input").fill(str(args.seed))
            page.locator("#var-generate").click()
            page.locator("#var-gallery img").nth(7).wait_for(state="visible")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#var-gallery img')].every(im => im.complete && im.naturalWidth)"
                " && document.querySelector('#var-info textarea').value.includes('seed')"
            )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, clip={"x": 0, "y": 0, "width": 1280, "height": 880})
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
