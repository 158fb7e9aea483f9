"""The demo in a real headless Chromium (Debian ``chromium`` driven by Playwright's Python package; no
browser download): pick a class / fill a prompt, click Generate, wait for the gallery image, read the seed
back; an error case shows its message in the page. Screenshots go to ``tests/artifacts/`` (git-ignored).

Skips when gradio, Playwright or Chromium is missing, except under DIFFUSERS_VAR_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import os
import shutil

import pytest

from demo_support import ARTIFACTS, missing, require, serve, tiny_folders

require("gradio", "pip install gradio")
sync_api = require(
    "playwright.sync_api", "pip install playwright (no `playwright install`: the Debian chromium is used)"
)

from diffusers_var.demo import FAMILIES, MAX_SEED, build_demo  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


def chromium_path() -> str | None:
    for candidate in (
        os.environ.get("DIFFUSERS_VAR_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    if not (FAMILIES["var"][2] / "model_index.json").is_file():
        pytest.skip("the embedded VAR pipeline is missing")
    folders = tiny_folders(tmp_path_factory.mktemp("browser-pipelines"))
    demo = build_demo(
        var=FAMILIES["var"][2], star=folders["star"], infinity=folders["infinity"], device="cpu", max_images=4
    )
    with serve(demo) as address:
        yield address, folders


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        missing("no Chromium binary (apt-get install -y chromium, or set DIFFUSERS_VAR_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url[0])
    page.wait_for_selector("#var-generate", state="visible")
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def seed_shown(page, prefix: str) -> int:
    return int(float(page.locator(f"#{prefix}-seed input").input_value()))


def wait_for_images(page, prefix: str, count: int) -> None:
    images = page.locator(f"#{prefix}-gallery img")
    images.nth(count - 1).wait_for(state="visible")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#{prefix}-gallery img')]"
        ".every(im => im.complete && im.naturalWidth > 0)"
    )


def test_var_pick_class_generate_and_read_seed(page):
    page.locator("#var-class input").click()
    page.locator("#var-class input").fill("yellow triangle on bl")  # the picker filters as you type
    page.get_by_role("option", name="yellow triangle on black").click()
    page.locator("#var-generate").click()
    wait_for_images(page, "var", 1)
    page.wait_for_function("() => document.querySelector('#var-info textarea').value.includes('seed')")
    info = page.locator("#var-info textarea").input_value()
    seed = seed_shown(page, "var")
    assert 0 <= seed <= MAX_SEED and f"seed {seed}," in info and "64x64 px" in info
    assert page.locator("#var-gallery img").count() >= 1


def test_star_prompt_generate_and_read_seed(page, url):
    if url[1]["star"] is None:
        pytest.skip("STAR text-encoder fixtures are absent")
    page.get_by_role("tab", name=FAMILIES["star"][0]).click()
    page.locator("#star-randomize input").uncheck()
    page.locator("#star-seed input").fill("1234")
    page.locator("#star-prompt textarea").fill("a red circle on a blue background")
    page.locator("#star-generate").click()
    wait_for_images(page, "star", 1)
    page.wait_for_function("() => document.querySelector('#star-info textarea').value.includes('seed 1234')")
    assert seed_shown(page, "star") == 1234


def test_empty_prompt_shows_the_error_in_the_page(page, url):
    if url[1]["infinity"] is None:
        pytest.skip("Infinity tokenizer fixtures are absent")
    page.get_by_role("tab", name=FAMILIES["infinity"][0]).click()
    page.locator("#infinity-prompt textarea").fill("")
    page.locator("#infinity-generate").click()
    page.get_by_text("Please enter a prompt").first.wait_for(state="visible")
    # the app keeps serving: a valid prompt afterwards generates
    page.locator("#infinity-prompt textarea").fill("a yellow triangle on a black background")
    page.locator("#infinity-generate").click()
    wait_for_images(page, "infinity", 1)


def test_unsupported_size_shows_the_supported_sizes(page, url):
    if url[1]["infinity"] is None:
        pytest.skip("Infinity tokenizer fixtures are absent")
    page.get_by_role("tab", name=FAMILIES["infinity"][0]).click()
    page.locator("#infinity-prompt textarea").fill("a red circle")
    size = page.locator("#infinity-size input")
    size.click()
    size.fill("1000x1000")
    size.press("Enter")
    page.locator("#infinity-generate").click()
    page.get_by_text("is not near any supported size").first.wait_for(state="visible")


def paint(page, element: str, start: tuple[float, float], end: tuple[float, float], steps: int = 12) -> None:
    """Drag the mouse (button down) across the editor's canvas, from and to fractions of its box."""
    page.locator(f"{element} button[aria-label='Brush']").first.click()
    box = page.locator(f"{element} canvas").first.bounding_box()
    x0, y0 = box["x"] + box["width"] * start[0], box["y"] + box["height"] * start[1]
    x1, y1 = box["x"] + box["width"] * end[0], box["y"] + box["height"] * end[1]
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, steps + 1):
        page.mouse.move(x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps, steps=2)
    page.mouse.up()


def test_edit_tab_paint_a_mask_and_in_paint(page, monkeypatch):
    """Paint on the example image with the brush, in-paint it with VAR, and get the edited images with their seed;
    the painted strokes reach the pipeline as the mask."""
    import diffusers_var.demo as demo_module

    seen = []
    painted_mask = demo_module.painted_mask
    monkeypatch.setattr(demo_module, "painted_mask", lambda value: seen.append(painted_mask(value)) or seen[-1])
    page.get_by_role("tab", name="Edit").click()
    page.wait_for_selector("#edit-image canvas", state="visible")
    paint(page, "#edit-image", (0.45, 0.4), (0.6, 0.55))
    page.locator("#edit-randomize input").uncheck()
    page.locator("#edit-seed input").fill("42")
    page.locator("#edit-what textarea").fill("yellow square on blue")
    page.locator("#edit-generate").click()
    wait_for_images(page, "edit", 2)
    page.wait_for_function("() => document.querySelector('#edit-info textarea').value.includes('seed 42')")
    assert "2 images of 64x64 px" in page.locator("#edit-info textarea").input_value()
    image, mask = seen[-1]
    assert image.shape[:2] == mask.shape and 0 < mask.mean() < 0.5  # the strokes, not the whole image


def test_edit_tab_without_paint_says_so_and_image_to_image_needs_none(page):
    page.get_by_role("tab", name="Edit").click()
    page.wait_for_selector("#edit-image canvas", state="visible")
    page.locator("#edit-generate").click()
    page.get_by_text("Paint the region with the brush first").first.wait_for(state="visible")
    page.get_by_text("Image-to-image: keep the image's coarse scales").click()
    page.locator("#edit-generate").click()
    wait_for_images(page, "edit", 2)
