"""The page at `/` in a real headless Chromium (Debian's package, driven by Playwright): a person picks an image
and sees it beside its translation, with the model card (and the precision that runs) and the time taken; a
refused image next shows its error and no translation. The screenshot is kept in test-artifacts/serve-page.png."""

import shutil

import httpx
import numpy as np
import pytest
from conftest import METADATA, REPO
from PIL import Image

from tests.corpus import gradient
from tests.serving import Server

pytestmark = pytest.mark.slow  # servers, clusters or processes: minutes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROWS = "rows => rows.map(row => Array.from(row.cells, cell => cell.textContent))"
# What the machine's closed network needs: no background connections, no sandbox as root, no GPU.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (`apt-get install chromium`; .ci/run installs it)")
def test_a_person_picks_an_image_and_sees_its_translation_with_the_card(tmp_path, tiny_translator):
    playwright_api = pytest.importorskip("playwright.sync_api")
    model = tiny_translator(tmp_path / "horse2zebra.onnx")
    photo, tiny = tmp_path / "horse.png", tmp_path / "tiny.png"
    Image.fromarray(gradient(96, 64)).save(photo)
    Image.fromarray(gradient(4, 4)).save(tiny)  # smaller than the network takes
    screenshot = REPO / "test-artifacts" / "serve-page.png"
    screenshot.parent.mkdir(exist_ok=True)

    with Server(model) as server, playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        outside = []
        ours = (server.url, "blob:", "data:")
        page.on("request", lambda request: request.url.startswith(ours) or outside.append(request.url))
        page.goto(server.url)
        page.wait_for_selector("#card td")
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.getElementById('status').textContent.startsWith('translated')", timeout=30000)
        page.wait_for_function("document.getElementById('output').naturalWidth > 0")
        size = page.evaluate(
            "[document.getElementById('output').naturalWidth, document.getElementById('output').naturalHeight]"
        )
        status = page.text_content("#status")
        card = {row[0]: row[1] for row in page.eval_on_selector_all("#card tr", ROWS)}
        page.screenshot(path=str(screenshot), full_page=True)
        page.set_input_files("#file", str(tiny))
        page.wait_for_function("document.getElementById('status').textContent.startsWith('error 422')")
        refused = page.text_content("#status")
        output_after_error = page.evaluate("document.getElementById('output').naturalWidth")
        browser.close()
        precision = httpx.get(f"{server.url}/v1/models").json()["precision"]

    assert size == [96, 64], "the translation has the photo's size"
    assert "horse.png" in status and " s (" in status, status
    assert card["name"] == "horse2zebra" and card["direction"] == METADATA["direction"] and card["provider"] == "cpu"
    assert card["precision"] == precision, "what runs, as /v1/models says; not the float32 model's card"
    assert "needs at least" in refused and output_after_error == 0, "no old translation beside the refused image"
    assert outside == [], "everything the page loads comes from the server"
    assert np.asarray(Image.open(screenshot)).std() > 0
