"""The prediction server through FastAPI's TestClient: every endpoint, every bad request, the token rule.

One tiny run (random tiny encoders, generated data) is fitted for the module; each bad request
must get a 4xx with one line in ``detail``, and the server must answer the next request as before.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
from conftest import TINY_MAX_TOKENS, write_data_dir
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import cli
from extract.dataset import LABELS, image_path, read_split, read_text
from extract.registry import IMAGE_ENCODERS, create_text_encoder
from extract.run import extract_features
from fusion.api import FitSpec, Post, Run, fit
from fusion.config import FitConfig
from fusion.decision import PriorRule
from serve.app import Batcher, Limits, check_binding, check_port_free, create_app

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_text_encoder_dir, _tiny_image_encoder_template):
    """A fitted tiny run, loaded once, and the data folder its posts come from."""
    name = "tiny-resnet18-serve"

    def image_encoder(**options):
        encoder = copy.deepcopy(_tiny_image_encoder_template)
        encoder.name = name
        return encoder

    IMAGE_ENCODERS[name] = image_encoder
    root = tmp_path_factory.mktemp("serve")
    data = write_data_dir(root / "data")
    for encoder in (create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS), image_encoder()):
        extract_features(encoder, data, root / "cache", batch_size=8, num_workers=0, progress=False)
    spec = FitSpec(str(tiny_text_encoder_dir), name, FitConfig(epochs=2, batch_size=8), {"hidden": 8})
    run = fit(spec, root / "run", data=data, cache=root / "cache")
    yield run, data
    del IMAGE_ENCODERS[name]


@pytest.fixture
def client(served):
    return TestClient(create_app(served[0], limits=Limits(max_upload_bytes=200_000, max_text_chars=300, max_batch=4)))


def upload(data, guid: str) -> tuple[str, bytes, str]:
    return f"{guid}.jpg", image_path(data, guid).read_bytes(), "image/jpeg"


def png(width: int, height: int, noise: bool = False) -> bytes:
    """A PNG file: one colour (compresses to little), or random pixels (does not)."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8) if noise else None
    image = Image.fromarray(pixels) if noise else Image.new("RGB", (width, height), (20, 120, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def refused(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail, detail
    for fragment in fragments:
        assert fragment in detail, detail
    return detail


def test_predict_answers_what_the_run_answers(served, client):
    run, data = served
    guid = read_split(data, "test")[0].guid
    text = read_text(data, guid)
    response = client.post("/predict", data={"text": text}, files={"image": upload(data, guid)})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = run.predict_proba(Post(text, image_path(data, guid)))[0]
    np.testing.assert_allclose([body["probabilities"][label] for label in LABELS], expected, atol=1e-6)
    assert body["label"] == LABELS[int(expected.argmax())] and "explanation" not in body and body["seconds"] >= 0


def test_predict_explains_with_words_and_a_patch_grid(served, client):
    run, data = served
    guid = read_split(data, "test")[1].guid
    response = client.post("/predict", data={"text": read_text(data, guid), "explain": "true"},
                           files={"image": upload(data, guid)})
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    assert explanation["target"] == response.json()["label"] and explanation["words"]
    grid = np.array(explanation["patch_grid"])  # (g, g)
    assert grid.shape == (2, 2)  # the tiny ResNet's 2 × 2 feature map
    np.testing.assert_allclose(grid.flatten(), explanation["patch_weights"][:4], atol=1e-6)


def predict_batch(client, data, guids: list[str]) -> tuple[list[Post], np.ndarray]:
    """POST the posts of ``guids`` to /predict/batch: the posts, and the probabilities (N, C) it answered."""
    texts = [read_text(data, guid) for guid in guids]
    response = client.post("/predict/batch", data={"texts": texts},
                           files=[("images", upload(data, guid)) for guid in guids])
    assert response.status_code == 200, response.text
    got = np.array([[p["probabilities"][label] for label in LABELS] for p in response.json()["predictions"]])
    return [Post(t, image_path(data, g)) for t, g in zip(texts, guids)], got


def test_batch_predicts_every_post_in_order(served, client):
    run, data = served
    posts, got = predict_batch(client, data, [row.guid for row in read_split(data, "test")][:3])
    np.testing.assert_allclose(got, run.predict_proba(posts), atol=1e-6)


def test_a_batch_decides_each_post_alone(served):
    # A rule fitted on the rows it is given (prior: class shares, from min_rows rows on) must see each post alone:
    # a post's answer is the same in a batch as sent by itself, whatever comes with it.
    run, data = served
    prior = Run(run.members, run.encoder_sets, PriorRule(prior=[0.8, 0.1, 0.1], min_rows=2), run.device)
    client = TestClient(create_app(prior, limits=Limits(max_batch=4)))
    guids = [row.guid for row in read_split(data, "test")][:4]
    posts, got = predict_batch(client, data, guids)
    alone = np.concatenate([prior.predict_proba([post]) for post in posts])  # one row: below min_rows, the mean
    np.testing.assert_allclose(got, alone, atol=1e-6)
    assert not np.allclose(prior.predict_proba(posts), alone, atol=1e-3)  # the rule does act on 4 rows together
    single = client.post("/predict", data={"text": posts[0].text}, files={"image": upload(data, guids[0])}).json()
    np.testing.assert_allclose([single["probabilities"][label] for label in LABELS], alone[0], atol=1e-6)


def test_runs_on_different_encoders_predict_but_refuse_to_explain(served):
    run, data = served
    key = run.members[0].encoders
    twin = dataclasses.replace(run.members[0], encoders="other")  # the same head, as if it read other encoders
    mixed = Run([run.members[0], twin], {key: run.encoder_sets[key], "other": run.encoder_sets[key]}, run.rule)
    client = TestClient(create_app(mixed))
    assert client.get("/health").json()["explainable"] is False
    guid = read_split(data, "test")[0].guid
    refused(client.post("/predict", data={"text": "a post", "explain": "true"}, files={"image": upload(data, guid)}),
            422, "explain needs members that share their encoders")
    answered = client.post("/predict", data={"text": "a post"}, files={"image": upload(data, guid)})
    assert answered.status_code == 200 and answered.json()["label"] in LABELS


def test_health_and_the_page(served, client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["labels"] == list(LABELS) and health["members"] == 1
    assert health["explainable"] is True
    assert health["encoders"]["image"] == "tiny-resnet18-serve" and health["limits"]["max_text_chars"] == 300
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<!doctype html>" in page.text.lower()
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_empty_text_is_allowed_and_predicts_on_the_image(served, client):
    _, data = served
    guid = read_split(data, "test")[0].guid
    response = client.post("/predict", data={"text": ""}, files={"image": upload(data, guid)})
    assert response.status_code == 200 and response.json()["label"] in LABELS
    assert client.post("/predict", files={"image": upload(data, guid)}).status_code == 200  # no text field at all


def test_bad_requests_get_one_line_and_the_server_keeps_serving(served, client, monkeypatch):
    _, data = served
    guid = read_split(data, "test")[0].guid
    jpeg = image_path(data, guid).read_bytes()
    cases = [
        (client.post("/predict", data={"text": "no image"}), 422, "image"),
        (client.post("/predict", data={"text": "x"}, files={"image": ("a.txt", b"plain text", "text/plain")}),
         400, "not a readable image"),
        (client.post("/predict", files={"image": ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}),
         400, "not a readable image"),
        (client.post("/predict", files={"image": ("empty.jpg", b"", "image/jpeg")}), 400, "empty upload"),
        (client.post("/predict", files={"image": ("big.bin", b"\0" * 200_001, "image/png")}), 413, "limit"),
        (client.post("/predict", data={"text": "x" * 301}, files={"image": upload(data, guid)}), 413, "300"),
        (client.post("/predict/batch", data={"texts": ["a", "b"]}, files=[("images", upload(data, guid))]),
         422, "2 texts and 1 images"),
        (client.post("/predict/batch", data={"texts": ["a"] * 5}, files=[("images", upload(data, guid))] * 5),
         413, "limit is 4"),
    ]
    for response, status, fragment in cases:
        refused(response, status, fragment)
        assert client.get("/health").status_code == 200
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # a decompression bomb, scaled down
    refused(client.post("/predict", files={"image": ("bomb.png", png(150, 150), "image/png")}), 413, "pixels")
    monkeypatch.undo()
    assert client.post("/predict", files={"image": ("ok.png", png(150, 150), "image/png")}).status_code == 200


def test_images_over_the_pixel_limit_and_oversized_bodies_are_refused_early(served):
    run, _ = served
    small = TestClient(create_app(run, limits=Limits(max_upload_bytes=1_000, max_pixels=150 * 150 - 1,
                                                     max_text_chars=10, max_batch=4)))
    # a few hundred bytes of PNG that decode to more pixels than allowed: refused from the header
    refused(small.post("/predict", files={"image": ("wide.png", png(150, 150), "image/png")}), 413,
            "150 × 150 = 22,500 pixels, over the limit of 22,499", "--max-megapixels")
    assert small.post("/predict", files={"image": ("ok.png", png(149, 150), "image/png")}).status_code == 200
    # a body larger than any request may be is refused from its Content-Length, before it is read
    with mock.patch("serve.app._post", side_effect=AssertionError("the body was read")):
        refused(small.post("/predict", files={"image": ("big.png", b"\0" * 30_000, "image/png")}), 413,
                "request body of", "the limit is 17,424")
    # a batch may be up to max_batch times larger: there the file itself is over its own limit
    refused(small.post("/predict/batch", data={"texts": ["a"]}, files=[("images", ("big.png", b"\0" * 30_000))]),
            413, "post 0: upload over the limit")


def test_uploads_leave_nothing_on_disk(served, client):
    _, data = served
    big = png(800, 800, noise=True)  # a spooled upload over 1 MB goes through a temporary file, removed after
    assert len(big) > 2**20
    roomy = TestClient(create_app(served[0], limits=Limits(max_upload_bytes=len(big) + 1)))
    before = set(os.listdir(tempfile.gettempdir()))
    assert roomy.post("/predict", files={"image": ("big.png", big, "image/png")}).status_code == 200
    assert set(os.listdir(tempfile.gettempdir())) - before == set()


def test_a_token_is_required_on_every_request(served):
    _, data = served
    guid = read_split(data, "test")[0].guid
    client = TestClient(create_app(served[0], token=TOKEN))
    for path in ("/", "/health", "/docs", "/openapi.json", "/nowhere"):
        refused(client.get(path), 401, "token")
        refused(client.get(path, headers={"Authorization": "Bearer wrong"}), 401, "token")
        refused(client.get(f"{path}?token=wrong"), 401, "token")
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code in (200, 404)
    refused(client.post("/predict", files={"image": upload(data, guid)}), 401, "token")
    ok = client.post("/predict", files={"image": upload(data, guid)}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    opened = client.get(f"/?token={TOKEN}")  # how the page is opened in a browser
    assert opened.status_code == 200 and "httponly" in opened.headers["set-cookie"].lower()
    assert client.get("/").status_code == 200  # a reload: the cookie carries the token
    assert client.post("/predict", files={"image": upload(data, guid)}).status_code == 200  # and the page's calls
    assert TestClient(create_app(served[0], token=TOKEN)).get("/").status_code == 401  # another browser has none


def test_binding_beyond_loopback_needs_a_token_or_insecure(served):
    check_binding("127.0.0.1", None, False)
    check_binding("0.0.0.0", TOKEN, False)
    check_binding("0.0.0.0", None, True)
    with pytest.raises(ValueError, match="--token"):
        check_binding("0.0.0.0", None, False)
    result = CliRunner().invoke(cli.app, ["serve", "--run", "nowhere", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and result.output.startswith("error: binding to 0.0.0.0")


def test_a_port_already_taken_is_one_line_before_the_run_loads():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot serve on 127.0.0.1:{port}: .*choose another --port"):
            check_port_free("127.0.0.1", port)
        with mock.patch("fusion.api.Run.load", side_effect=AssertionError("the run was loaded")):
            result = CliRunner().invoke(cli.app, ["serve", "--run", "nowhere", "--port", str(port)])
    assert result.exit_code == 1 and result.output.startswith(f"error: cannot serve on 127.0.0.1:{port}")
    check_port_free("127.0.0.1", port)  # free again once its holder closed it


def test_concurrent_posts_are_batched_and_each_gets_its_own_probabilities(served):
    run, data = served
    guids = [row.guid for split in ("test", "train") for row in read_split(data, split)][:10]
    posts = [Post(read_text(data, guid), image_path(data, guid)) for guid in guids]
    sizes, turn = [], threading.Lock()
    batcher = Batcher(run, turn, max_batch=8)
    member_probabilities = run.member_probabilities
    arrived = threading.Semaphore(0)
    put = batcher.waiting.put
    with (
        mock.patch.object(run, "member_probabilities", lambda batch: sizes.append(len(batch)) or
                          member_probabilities(batch)),
        mock.patch.object(batcher.waiting, "put", lambda item: put(item) or arrived.release()),
    ):
        with turn:  # the model is busy: every post arrives while the worker waits for its turn
            pool = ThreadPoolExecutor(len(posts))
            answers = [pool.submit(batcher.predict_proba, post) for post in posts]
            for _ in posts:
                assert arrived.acquire(timeout=30), "a post never reached the batcher"
        got = np.array([answer.result(timeout=60) for answer in answers])
    # the worker took what had arrived before it waited (at least one), then the rest in batches of at most 8
    assert sum(sizes) == len(posts) and max(sizes) <= 8 and len(sizes) <= 3, sizes
    np.testing.assert_allclose(got, np.concatenate([run.predict_proba([post]) for post in posts]), atol=1e-6)


def test_a_post_that_fails_in_the_model_fails_alone_not_its_batch(served):
    run, data = served
    guids = [row.guid for row in read_split(data, "test")][:4]
    posts = [Post(read_text(data, guid), image_path(data, guid)) for guid in guids]
    bad = Post("the post the model trips on", image_path(data, guids[0]))
    turn, arrived = threading.Lock(), threading.Semaphore(0)
    batcher = Batcher(run, turn, max_batch=8)
    member_probabilities = run.member_probabilities

    def trips(batch):
        if any(post is bad for post in batch):
            raise RuntimeError("the model tripped")
        return member_probabilities(batch)

    put = batcher.waiting.put
    with (
        mock.patch.object(run, "member_probabilities", trips),
        mock.patch.object(batcher.waiting, "put", lambda item: put(item) or arrived.release()),
    ):
        with turn:  # every post arrives while the worker waits: they go through as one batch
            pool = ThreadPoolExecutor(len(posts) + 1)
            answers = [pool.submit(batcher.predict_proba, post) for post in [*posts, bad]]
            for _ in answers:
                assert arrived.acquire(timeout=30), "a post never reached the batcher"
        with pytest.raises(RuntimeError, match="the model tripped"):
            answers[-1].result(timeout=60)
        got = np.array([answer.result(timeout=60) for answer in answers[:-1]])
    np.testing.assert_allclose(got, np.concatenate([run.predict_proba([post]) for post in posts]), atol=1e-6)
