"""The prediction server: one loaded ``Run`` behind FastAPI, and the web page that calls it.

    GET  /               the web page (page.html: type a text, drop an image, see why)
    GET  /health         what is served: members, decision rule, encoders, labels
    POST /predict        multipart text + image [+ explain=true] → label, probabilities (and attributions)
    POST /predict/batch  multipart texts + images, paired in order → one result per post
    GET  /docs           the OpenAPI documentation FastAPI generates

The run is loaded once, before the first request (its encoders and heads stay in memory), and
work takes turns on it: the model math already uses every core, so running two at once would
only split them. Single posts that arrive while the model is busy wait together and go through
it as one batch (``Batcher``): a batch of 32 posts costs about a third per post of one post
alone on a 2-core CPU (benchmarks/serve.py), so concurrent clients are served faster, and each
post's probabilities are its own (the decision rule is applied row by row; a post that fails in the
model is retried alone, so that it fails only its own request). Uploads are read into
memory, never written to disk, and checked before any model work: a bad request costs a 4xx
with one line in ``detail``, and the server keeps serving.
"""

from __future__ import annotations

import errno
import hmac
import math
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from extract.dataset import BadImageError, ImageTooLargeError
from fusion.api import Post, Run
from fusion.explain import DEFAULT_STEPS, Explanation, patch_grid

PAGE = Path(__file__).with_name("page.html")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "mmsent_token"
FORM_OVERHEAD_BYTES = 16_384  # multipart boundaries, field headers and the small fields (explain) of one post


@dataclass(frozen=True)
class Limits:
    """What one request may send; larger inputs are refused before they reach the model."""

    max_upload_bytes: int = 10 * 2**20  # one image file
    max_pixels: int = 40_000_000  # one decoded image (120 MB as RGB); a few KB of PNG can claim far more
    max_text_chars: int = 2_000  # one post's text (a tweet is 280)
    max_batch: int = 64  # posts in one /predict/batch call
    explain_steps: int = DEFAULT_STEPS  # Integrated Gradients path points of explain=true

    def max_request_bytes(self, posts: int) -> int:
        """The largest request body ``posts`` posts can need: their files and texts (UTF-8), and the form's framing."""
        return posts * (self.max_upload_bytes + 4 * self.max_text_chars + FORM_OVERHEAD_BYTES)


def check_binding(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to serve beyond this machine without a token, unless the user says so (``--insecure``)."""
    if host not in LOOPBACK and not token and not insecure:
        raise ValueError(
            f"binding to {host} would let anyone who can reach this machine use the model: give --token SECRET "
            "(clients then send 'Authorization: Bearer SECRET'), or --insecure to serve without one"
        )


def check_port_free(host: str, port: int) -> None:
    """Refuse, in one line, an address this process cannot listen on (another server holds the port, or the host is
    not one of this machine's)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv6 for ::1
        with socket.create_server((host, port), family=family):
            pass
    except OSError as error:
        fix = "choose another --port" if error.errno == errno.EADDRINUSE else "check --host"
        raise ValueError(f"cannot serve on {host}:{port}: {error.strerror or error}; {fix}") from None


class Batcher:
    """Single posts predicted in batches: a worker thread takes every post waiting (up to ``max_batch``)
    whenever the model is free, so an idle server answers one post at once and a busy one in batches."""

    def __init__(self, run: Run, turn: threading.Lock, max_batch: int):
        self.run, self.turn, self.max_batch = run, turn, max_batch
        self.waiting: queue.Queue[tuple[Post, Future]] = queue.Queue()
        threading.Thread(target=self._work, name="mmsent-batcher", daemon=True).start()

    def predict_proba(self, post: Post) -> np.ndarray:
        """The run's probabilities (C,) of one post, as ``run.predict_proba([post])[0]`` gives them."""
        answer: Future = Future()
        self.waiting.put((post, answer))
        return answer.result()

    def _work(self) -> None:
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                self._answer(batch)
            except Exception as error:  # the worker keeps serving
                if len(batch) == 1:
                    batch[0][1].set_exception(error)
                    continue
                for item in batch:  # a post at fault must not fail the posts batched with it: each alone
                    try:
                        self._answer([item])
                    except Exception as alone:
                        item[1].set_exception(alone)

    def _answer(self, batch: list[tuple[Post, Future]]) -> None:
        with self.turn:
            members = self.run.member_probabilities([post for post, _ in batch])  # (M, B, C)
        for probabilities, (_, answer) in zip(self.run.decide_each(members), batch):
            answer.set_result(probabilities)


def create_app(run: Run, *, token: str | None = None, limits: Limits = Limits()) -> FastAPI:
    """The FastAPI application serving ``run``; ``token``, when given, is required on every request."""
    app = FastAPI(
        title="mmsent", version="1",
        description="Image–text sentiment (positive / neutral / negative) of social-media posts.",
    )
    turn = threading.Lock()  # one piece of work on the model at a time (see the module docstring)
    batcher = Batcher(run, turn, limits.max_batch)

    @app.middleware("http")
    async def bounded(request: Request, call_next: Any) -> Any:
        """Refuse a body larger than any allowed request from its Content-Length, before it is received (Starlette
        would spool it to a temporary file first). A body sent without one is still bounded per file as it is read."""
        posts = limits.max_batch if request.url.path.rstrip("/").endswith("/batch") else 1
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_request_bytes(posts):
            return JSONResponse({"detail": f"request body of {int(declared):,} bytes; the limit is "
                                           f"{limits.max_request_bytes(posts):,} (--max-upload-mb)"}, status_code=413)
        return await call_next(request)

    @app.middleware("http")
    async def authorised(request: Request, call_next: Any) -> Any:
        """With a token, every path (the page, the API, /docs) needs it: as a bearer header, as ``?token=`` (how a
        browser opens the page; the answer then sets it as a same-site cookie, so a reload works) or that cookie."""
        if token is None:
            return await call_next(request)
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else (
            request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE, "")
        )
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(RequestValidationError)
    async def one_line(request: Request, error: RequestValidationError) -> JSONResponse:
        """FastAPI's validation report, as one line: which field, and what is wrong with it."""
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in error.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict[str, Any]:
        first = run.members[0].config.get("encoders", {})
        return {
            "status": "ok",
            "labels": list(run.labels),
            "members": len(run.members),
            "decision": run.rule.name,
            "explainable": run.explainable,
            "encoders": {kind: description.get("encoder") for kind, description in first.items()},
            "limits": {"max_upload_mb": limits.max_upload_bytes / 2**20, "max_megapixels": limits.max_pixels / 1e6,
                       "max_text_chars": limits.max_text_chars, "max_batch": limits.max_batch},
        }

    @app.post("/predict")
    def predict(
        image: UploadFile = File(..., description="The post's image (JPEG, PNG, GIF, WebP, …)."),
        text: str = Form("", description="The post's text; empty predicts from the image (and its text, +ocr)."),
        explain: bool = Form(False, description="Also return which words and image regions pushed the prediction."),
    ) -> dict[str, Any]:
        if explain and not run.explainable:
            raise HTTPException(422, "explain needs members that share their encoders (one run, or the folds of one); "
                                     "this server's runs read different ones: ask without explain")
        post = _post(text, image, limits)
        started = time.perf_counter()
        if explain:
            with turn:
                explanation, _ = run.explain(post, steps=limits.explain_steps)
            result = {"label": explanation.label, "probabilities": explanation.probabilities,
                      "explanation": _explanation_json(explanation, _image_length(run))}
        else:
            result = _prediction(run, batcher.predict_proba(post))
        return result | {"seconds": round(time.perf_counter() - started, 4)}

    @app.post("/predict/batch")
    def predict_batch(
        images: list[UploadFile] = File(..., description="One image per post."),
        texts: list[str] = Form(..., description="One text per post, in the order of the images."),
    ) -> dict[str, Any]:
        if len(texts) != len(images):
            raise HTTPException(422, f"{len(texts)} texts and {len(images)} images: give one of each per post")
        if len(images) > limits.max_batch:
            raise HTTPException(413, f"{len(images)} posts in one batch; the limit is {limits.max_batch}")
        posts = [_post(text, image, limits, f"post {i}") for i, (text, image) in enumerate(zip(texts, images))]
        started = time.perf_counter()
        with turn:
            members = run.member_probabilities(posts)  # (M, N, C)
        return {
            "predictions": [_prediction(run, p) for p in run.decide_each(members)],  # each post decided alone
            "seconds": round(time.perf_counter() - started, 4),
        }

    return app


def _post(text: str, upload: UploadFile, limits: Limits, name: str = "image") -> Post:
    """A checked post from a form's text and upload: 413 when too large (bytes, pixels or text), 400 when not an
    image."""
    if len(text) > limits.max_text_chars:
        raise HTTPException(413, f"{name}: text of {len(text)} characters; the limit is {limits.max_text_chars}")
    data = upload.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise HTTPException(
            413, f"{name}: upload over the limit of {limits.max_upload_bytes / 2**20:g} MB (--max-upload-mb)"
        )
    if not data:
        raise HTTPException(400, f"{name}: empty upload")
    try:
        return Post(text, Post(text, data).picture(upload.filename or name, limits.max_pixels))  # decoded once, here
    except ImageTooLargeError as error:
        raise HTTPException(413, f"{name}: {error.reason} (--max-megapixels)") from None
    except BadImageError as error:
        raise HTTPException(400, f"{name}: not a readable image ({error.reason})") from None


def _prediction(run: Run, probabilities: np.ndarray) -> dict[str, Any]:
    """The label and the class probabilities of one post's (C,) probabilities."""
    return {"label": run.labels[int(probabilities.argmax())],
            "probabilities": dict(zip(run.labels, map(float, probabilities)))}


def _image_length(run: Run) -> int:
    """Positions of the first image encoder: its patch grid is what the page draws."""
    image = run.members[0].config["encoders"]["image"]
    return int(image.get("streams", [image])[0]["length"])


def _explanation_json(explanation: Explanation, image_length: int) -> dict[str, Any]:
    """The explanation as JSON with the first image encoder's patch weights as a square grid (rows top to bottom)."""
    grid, dropped = patch_grid(explanation.patch_weights[:image_length])
    data = explanation.to_dict()
    data["patch_grid"] = [[float(w) if math.isfinite(w) else 0.0 for w in row] for row in grid]
    data["class_token_dropped"] = dropped
    return data
