"""The web page of ``serve`` (serve/page.html) in a real browser: headless Chromium driven by Playwright.

A tiny run (random encoders, "+ocr" text) is served by uvicorn on a free loopback port; the page is
opened, a post typed and chosen, Predict clicked, and what it shows is compared with the API's own
numbers: the bars with ``Run.predict_proba``, the heatmap canvas drawn, the words shaded. Debian's
Chromium is used (``$MMSENT_CHROMIUM`` or ``chromium`` on the PATH; .ci/run installs it): Playwright's
own browser download is not reachable from these machines.

With ``MMSENT_SCREENSHOT=path`` set, the page after a prediction is saved there as a PNG.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import TINY_MAX_TOKENS, build_tiny_image_encoder, write_data_dir
from test_api import SizeReader, fit_by_cli

from extract.dataset import LABELS, image_path, read_split, read_text
from extract.ocr import extract_ocr
from extract.registry import IMAGE_ENCODERS, create_encoder
from extract.run import extract_features
from fusion.api import Post, Run

playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

CHROMIUM = os.environ.get("MMSENT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no Chromium: apt-get install chromium (or set MMSENT_CHROMIUM)")

IMAGE_ENCODER = "tiny-resnet18-page"  # registered for this module only
TOKEN = "s3cret-token"
TIMEOUT_MS = 60_000  # a busy 2-core machine: generous, but a hung page still fails


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, tiny_text_encoder_dir) -> Iterator[dict]:
    """A fit run of the tiny encoders on the generated data, loaded: as tests/test_api.py's ``cached`` + fit.

    Module-scoped (the tests share one run): the tiny image encoder is registered, and rapidocr replaced
    by ``SizeReader``, for the whole module.
    """
    root = tmp_path_factory.mktemp("page")
    data, cache = write_data_dir(root / "data"), root / "cache"
    IMAGE_ENCODERS[IMAGE_ENCODER] = lambda **options: build_tiny_image_encoder(IMAGE_ENCODER)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("extract.encoders.hf_text.OcrReader", SizeReader)
        try:
            guids = [row.guid for split in ("train", "test") for row in read_split(data, split)]
            texts = extract_ocr(data, cache, guids, progress=False, reader=SizeReader(), workers=0)
            text = f"{tiny_text_encoder_dir}+ocr"
            for kind, name in (("text", text), ("image", IMAGE_ENCODER)):
                encoder = create_encoder(kind, name, **({"max_tokens": TINY_MAX_TOKENS} if kind == "text" else {}))
                if getattr(encoder, "ocr", False):
                    encoder.ocr_texts.update(texts)
                extract_features(encoder, data, cache, batch_size=8, num_workers=0, progress=False)
            cached = {"data": data, "cache": cache, "text": text, "image": IMAGE_ENCODER}
            run = Run.load(fit_by_cli(cached, root / "run"))
            yield {"run": run, "data": data, "guid": read_split(data, "test")[0].guid}
        finally:
            IMAGE_ENCODERS.pop(IMAGE_ENCODER, None)


@contextmanager
def serving(run: Run, token: str | None = None) -> Iterator[str]:
    """``create_app(run)`` served by uvicorn in a background thread on a free loopback port; yields its URL."""
    from serve.app import create_app

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))  # the port is ours from here: no race with another process
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(run, token=token), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def predict_in_page(page, text: str, image: Path) -> list[dict]:
    """Type ``text``, choose ``image``, press Predict; the bars once three are shown (label, probability)."""
    page.fill("#text", text)
    page.set_input_files("#image-input", str(image))
    page.click("#predict")
    page.wait_for_function("document.querySelectorAll('#bars [data-label]').length === 3 && "
                           "!document.getElementById('predict').classList.contains('busy')")
    return page.eval_on_selector_all(
        "#bars [data-label]", "rows => rows.map(r => ({label: r.dataset.label, p: Number(r.dataset.probability)}))"
    )


def heatmap_pixels(page) -> dict:
    """Size of the #heatmap canvas and how many of its pixels are not fully transparent, once it is drawn."""
    page.wait_for_function("(c => c.width > 0 && c.height > 0 && c.dataset.grid)(document.getElementById('heatmap'))")
    return page.evaluate("""() => {
        const c = document.getElementById('heatmap');
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let opaque = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) opaque++;
        return {width: c.width, height: c.height, opaque};
    }""")


def test_the_page_predicts_and_explains_a_post_as_the_api_does(served_run, page):
    run, data, guid = served_run["run"], served_run["data"], served_run["guid"]
    text, image = read_text(data, guid), image_path(data, guid)
    with serving(run) as url:
        page.goto(url + "/")
        assert page.is_disabled("#predict")  # nothing to predict before an image is chosen
        page.wait_for_function("document.getElementById('model').textContent.includes('image:')")  # /health

        # An upload that is no image: the server's one-line detail is shown, as it is.
        page.set_input_files("#image-input", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                     "buffer": b"not an image at all"}])
        assert page.is_enabled("#predict")
        page.click("#predict")
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        response = httpx.post(url + "/predict", data={"text": "x"}, files={"image": ("notes.txt", b"not an image")})
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert "not a readable image" in detail
        assert page.text_content("#error") == detail
        assert page.is_visible("#error")

        bars = predict_in_page(page, text, image)
        api = httpx.post(url + "/predict", data={"text": text, "explain": "true"},
                         files={"image": (image.name, image.read_bytes())}, timeout=60).json()
    assert page.text_content("#error") == ""  # cleared by the next request

    assert [bar["label"] for bar in bars] == list(LABELS)
    shown = np.array([bar["p"] for bar in bars])
    assert abs(shown.sum() - 1) < 1e-3
    np.testing.assert_allclose(shown, [api["probabilities"][label] for label in LABELS], atol=1e-6)
    np.testing.assert_allclose(shown, run.predict_proba(Post(text, image))[0], atol=1e-5)
    assert page.text_content("#label").strip() == LABELS[int(shown.argmax())] == api["label"]
    assert page.get_attribute(f"#bars [data-label={api['label']}]", "class").split() == ["bar", "top"]

    pixels = heatmap_pixels(page)
    assert pixels["width"] > 0 and pixels["height"] > 0 and pixels["opaque"] > 0
    assert page.evaluate("document.getElementById('heatmap').dataset.grid") == str(
        len(api["explanation"]["patch_grid"]))

    shaded = page.eval_on_selector_all("#words .w", """spans => spans.filter(s => {
        const alpha = getComputedStyle(s).backgroundColor.match(/rgba?\\(([^)]*)\\)/)[1].split(',')[3];
        return alpha !== undefined && Number(alpha) > 0;
    }).length""")
    assert shaded >= 1
    words = api["explanation"]["words"]
    assert page.locator("#words .w").count() == len(words)
    assert page.locator("#words .marker").count() == int(any(word["ocr"] for word in words))  # "image text:"
    first, target = words[0]["weight"], api["explanation"]["target"]
    title = re.fullmatch(r"([+−])(\S+) (towards|against) (\w+)", page.get_attribute("#words .w >> nth=0", "title"))
    assert title, "hovering a word tells its weight"
    assert title[1] + title[3] == ("+towards" if first >= 0 else "−against") and title[4] == target
    assert float(title[2]) == pytest.approx(abs(first), rel=0.05, abs=5e-4)

    if os.environ.get("MMSENT_SCREENSHOT"):
        page.screenshot(path=os.environ["MMSENT_SCREENSHOT"], full_page=True)


def test_runs_on_different_encoders_leave_explain_off_and_still_predict(served_run, page):
    run, data, guid = served_run["run"], served_run["data"], served_run["guid"]
    key = run.members[0].encoders
    twin = dataclasses.replace(run.members[0], encoders="other")  # the same head, as if it read other encoders
    mixed = Run([run.members[0], twin], {key: run.encoder_sets[key], "other": run.encoder_sets[key]}, run.rule)
    with serving(mixed) as url:
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('explain').disabled")  # once /health has answered
        assert not page.is_checked("#explain")
        bars = predict_in_page(page, read_text(data, guid), image_path(data, guid))
    assert page.text_content("#error") == ""
    assert [bar["label"] for bar in bars] == list(LABELS)


def test_with_a_token_the_page_needs_it_and_sends_it_as_a_bearer_header(served_run, page):
    run, data, guid = served_run["run"], served_run["data"], served_run["guid"]
    with serving(run, token=TOKEN) as url:
        assert httpx.get(url + "/").status_code == 401
        assert httpx.get(url + "/health").status_code == 401
        response = page.goto(url + "/")
        assert response.status == 401 and "token" in response.json()["detail"]

        assert page.goto(f"{url}/?token={TOKEN}").status == 200
        assert page.url == url + "/"  # the token is taken out of the address bar (and its history entry)
        bars = predict_in_page(page, read_text(data, guid), image_path(data, guid))
        assert len(bars) == 3 and page.text_content("#error") == ""
        assert "image:" in page.text_content("#model")  # /health answered too
