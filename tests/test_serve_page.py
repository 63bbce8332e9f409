"""The page at `/` in a real headless Chromium (Debian's package, driven by Playwright): a person picks an image
and sees it beside its translation, with the model card and the time taken. The screenshot is kept in
test-artifacts/serve-page.png."""

import shutil

import numpy as np
import pytest
from conftest import METADATA, REPO, export_tiny_translator
from PIL import Image

from tests.corpus import gradient
from tests.serving import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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
def test_a_person_picks_an_image_and_sees_its_translation_with_the_card(tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    model = export_tiny_translator(tmp_path / "horse2zebra.onnx")
    photo = tmp_path / "horse.png"
    Image.fromarray(gradient(96, 64)).save(photo)
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
        card = page.text_content("#card")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()

    assert size == [96, 64], "the translation has the photo's size"
    assert "horse.png" in status and " s (" in status, status
    assert "horse2zebra" in card and METADATA["direction"] in card and "cpu" in card
    assert outside == [], "everything the page loads comes from the server"
    assert np.asarray(Image.open(screenshot)).std() > 0
