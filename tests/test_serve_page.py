"""The web page in a real headless browser (Debian's Chromium driven by Playwright) against a
real server: upload a demo scene, run caption, detect and explain, check the text, the drawn box
and the heatmap.

Set SERVE_SCREENSHOT=path.png to keep the screenshot (docs/serve_page.png was made so).
"""

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi) is not installed")
playwright = pytest.importorskip("playwright.sync_api",
                                 reason="playwright (pip) is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium)",
                allow_module_level=True)

from test_serve import scene_image  # noqa: E402
from test_serve_load import running_server  # noqa: E402

from paligemma.serve.app import ServeConfig, create_app  # noqa: E402
from paligemma.tasks import parse_detections  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
FIRST_BOX_COLOR = (230, 25, 75)  # PALETTE[0] of the page, as paligemma.annotate


def test_upload_a_scene_then_caption_detect_and_explain(demo_pg, tmp_path):
    image = scene_image(1)  # a yellow circle, an orange star and a purple square; 448 px
    path = tmp_path / "scene.png"
    image.save(path)
    caption = demo_pg.generate(image, "caption en").text
    text = demo_pg.generate(image, "detect circle").text
    (expected,) = parse_detections(text, *image.size)
    screenshot = Path(os.environ.get("SERVE_SCREENSHOT", tmp_path / "page.png"))

    app = create_app(demo_pg, ServeConfig(model_id="paligemma-demo"))
    with running_server(app) as base, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(base)
            page.wait_for_function("document.getElementById('model').textContent"
                                   ".includes('paligemma-demo')")
            page.set_input_files("#file", str(path))
            page.wait_for_selector("#run:not([disabled])")

            page.select_option("#task", "caption")
            page.click("#run")
            page.wait_for_selector("body[data-done=caption]", timeout=60_000)
            assert page.inner_text("#output") == caption

            page.select_option("#task", "detect")
            page.fill("#text-input", "circle")
            page.click("#run")
            page.wait_for_selector("body[data-done=detect]", timeout=60_000)
            assert page.inner_text("#output") == text
            (drawn,) = json.loads(page.get_attribute("#overlay", "data-boxes"))
            assert drawn["label"] == "circle"
            assert drawn["box"] == pytest.approx(expected.box, abs=0.01)
            x0, y0, x1, y1 = drawn["box"]
            # The canvas holds the box outline in its color, and nothing inside the box.
            pixel = "([x, y]) => Array.from(document.getElementById('overlay')" \
                    ".getContext('2d').getImageData(x, y, 1, 1).data)"
            edge = page.evaluate(pixel, [round((x0 + x1) / 2), round(y0)])
            inside = page.evaluate(pixel, [round((x0 + x1) / 2), round((y0 + y1) / 2)])
            assert tuple(edge) == (*FIRST_BOX_COLOR, 255) and inside[3] == 0
            assert "circle: box" in page.inner_text("#objects")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))

            page.select_option("#task", "explain")  # the prompt defaults to "caption en"
            page.click("#run")
            page.wait_for_selector("body[data-done=explain]", timeout=60_000)
            assert page.inner_text("#output") == caption
            assert page.is_visible("#heatmap")
            n_tokens = len(demo_pg.generate(image, "caption en").tokens)
            assert page.locator("#pieces span").count() == n_tokens + 1  # + "all tokens"
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
