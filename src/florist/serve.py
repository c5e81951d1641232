"""Stage 8, *serve*: a model behind an HTTP API and a web page (FastAPI + uvicorn).

    florist serve runs/flowers          # the run folder, on its engine (OpenVINO on a CPU, else torch)
    florist serve runs/flowers --engine torch
    florist serve model.onnx            # ONNX Runtime back end (an exported file; no torch used)
    florist serve model.xml             # OpenVINO back end (an exported file; no torch used)

Endpoints: ``POST /predict`` (an image as multipart field ``file`` or as the raw
request body; JSON top-k labels and calibrated probabilities, and for a run folder its
``ood_score`` and whether it is ``unknown``: see :mod:`florist.ood`), ``GET /labels``,
``GET /health``, ``GET /`` (a self-contained page: drop or pick a photo, see it,
its top-k bars and, for a run folder, its heatmap) and the OpenAPI docs at ``/docs``.
``POST /predict?heatmap=1`` adds ``heatmap``: a base64 PNG of where the network found
its answer (:mod:`florist.explain`); only a run folder has the gradients, so an
exported file answers without it.

Bad input is always a 4xx JSON ``{"error": "..."}``, never a 500: bodies over the
size limit get 413 (checked from ``Content-Length`` and while the body streams in),
anything that does not decode to an image gets 415, an empty request 400. Images
are decoded by :func:`florist.data.decode_image`, which refuses pixel bombs from
their header.

Concurrency: decoding and preprocessing run in the thread pool, and a single
:class:`Batcher` task feeds the model, so requests that arrive while the model is
busy are answered together by its next call. The event loop never waits on the
model.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .data import BadImage
from .errors import FloristError
from .loader import load
from .prediction import rank
from .runtime import ArrayClassifier, refuse_ood_threshold

log = logging.getLogger("florist")

#: Largest request body accepted by default (bytes).
DEFAULT_MAX_BYTES = 20_000_000
#: Most images the model is given in one call.
MAX_BATCH = 16


def load_model(path: str | Path, engine: str | None = None) -> ArrayClassifier:
    """The serving back end for ``path``: its runtime for an exported file, else the run folder's graph.

    A run folder's graph runs on ``engine`` (default: the one its features were
    computed with, where it runs here; see :mod:`florist.engines`).

    Raises:
        FloristError: not a finished run folder or a florist-exported ONNX or OpenVINO file.
    """
    model = load(path, engine=engine)
    if isinstance(model, ArrayClassifier):  # an exported file, run by its own runtime
        return model
    from .export import GraphClassifier

    return GraphClassifier(model)


class Heatmaps:
    """Heatmap PNGs for a served run folder, its :class:`~florist.explain.Explainer` made on first use.

    The explainer hooks the network it differentiates, so it gets its own copy of the
    served graph (made once, when a heatmap is first asked for).
    """

    def __init__(self, model: ArrayClassifier):
        self.model = model
        self._explainer: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def available(model: ArrayClassifier) -> bool:
        """Whether ``model`` is a run folder's graph (an exported file has no gradients)."""
        return getattr(model, "graph", None) is not None

    def png(self, data: bytes, label: str) -> str:
        """Base64 PNG of the heatmap of ``label`` (the served answer) in an image's bytes."""
        from .explain import Explainer

        with self._lock:
            if self._explainer is None:
                self._explainer = Explainer.of_graph(self.model.graph, self.model.classes)
        heatmap = self._explainer.explain_bytes(data, target=label)
        return base64.b64encode(heatmap.encoded()).decode("ascii")


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


class Batcher:
    """Feeds a model from one task: images queued while it runs form its next batch.

    No timer is involved: a lone request is run at once, and under load every model
    call takes whatever has queued up (up to ``max_batch``), which is when batching pays.
    The model runs in a worker thread, so the event loop stays free.
    """

    def __init__(self, model: ArrayClassifier, max_batch: int = MAX_BATCH):
        self.model = model
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[dict[str, np.ndarray], asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure_running(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(self._queue))
        assert self._queue is not None
        return self._queue

    def queued(self) -> int:
        """Images waiting for the model."""
        return self._queue.qsize() if self._queue is not None else 0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, RuntimeError):
                pass
            self._task = None

    async def outputs(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, float | None]:
        """``[classes]`` probabilities and the out-of-distribution score (None without a detector) of one image."""
        future = asyncio.get_running_loop().create_future()
        await self._ensure_running().put((arrays, future))
        return await future

    async def _run(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                probs, scores = await run_in_threadpool(self.model.outputs_of, [arrays for arrays, _ in batch])
            except Exception as e:  # a model failure answers its requests, never kills the loop
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for i, ((_, future), row) in enumerate(zip(batch, probs)):
                if not future.done():
                    future.set_result((row, None if scores is None else float(scores[i])))


# ---------------------------------------------------------------------------
# Request size limit
# ---------------------------------------------------------------------------


def _size_message(max_bytes: int) -> str:
    return f"request body larger than the {max_bytes / 1e6:g} MB limit"


class BodyTooLarge(HTTPException):
    """Raised while a request body streams in past the limit (an HTTP error, so form parsing passes it on)."""

    def __init__(self, max_bytes: int):
        super().__init__(413, _size_message(max_bytes))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class LimitBody:
    """ASGI middleware: refuse bodies over ``max_bytes`` from their header, or as soon as they exceed it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await _error(400, "invalid Content-Length header")(scope, receive, send)
                return
            if too_big:
                await _error(413, _size_message(self.max_bytes))(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


# ---------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------


@functools.cache
def page() -> str:
    """The web page: one HTML file with its CSS and JavaScript inline (nothing fetched from elsewhere)."""
    return resources.files("florist").joinpath("page.html").read_text(encoding="utf-8")


def create_app(
    model: ArrayClassifier,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str = "",
    ood_threshold: float | None = None,
) -> FastAPI:
    """The FastAPI application serving ``model`` (see the module docstring for the endpoints).

    Args:
        model: from :func:`load_model` (or any :class:`~florist.runtime.ArrayClassifier`).
        max_bytes: largest request body accepted.
        name: shown by ``/health`` (the model's path).
        ood_threshold: answer ``"unknown": true`` above this out-of-distribution score
            (default: the run's own; refused for models without a detector).
    """
    if max_bytes < 1:
        raise FloristError(f"the request size limit must be positive, got {max_bytes} bytes")
    refuse_ood_threshold(ood_threshold, has_detector=model.has_ood)
    threshold = model.ood_threshold if ood_threshold is None else ood_threshold
    batcher = Batcher(model)
    heatmaps = Heatmaps(model) if Heatmaps.available(model) else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.stop()

    app = FastAPI(
        title="florist",
        summary="Image classifier trained with florist.",
        description=f"Classes: {', '.join(model.classes)}. Send a photo to `POST /predict`.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.add_middleware(LimitBody, max_bytes=max_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page()

    @app.get("/health", summary="Liveness and what is served")
    def health() -> dict[str, Any]:
        return {"status": "ok", "backend": model.backend, "classes": len(model.classes), "model": name}

    @app.get("/labels", summary="The class names, in the model's order")
    def labels() -> dict[str, list[str]]:
        return {"labels": list(model.classes)}

    @app.post(
        "/predict",
        summary="Classify one image",
        description="Send the image as multipart form field `file`, or as the raw request body "
        "(any image Content-Type or application/octet-stream). Returns the top-k labels, best first; a run "
        "folder adds `ood_score` (higher = less like the training photos) and `unknown`.",
        responses={
            400: {"description": "Empty request or malformed form"},
            413: {"description": "Body over the size limit"},
            415: {"description": "Not a usable image (the reason is in `error`)"},
            422: {"description": "Invalid query parameter"},
        },
    )
    async def predict(
        request: Request,
        file: UploadFile | None = File(None, description="The image (or send it as the raw body)."),
        top_k: int = Query(5, ge=1, le=1000, description="How many classes to return."),
        heatmap: bool = Query(
            False, description="Add `heatmap`: a base64 PNG of where the network found its answer (run folders only)."
        ),
    ) -> dict[str, Any]:
        if file is not None:
            data, filename = await file.read(), file.filename or ""
        elif request.headers.get("content-type", "").startswith(
            ("multipart/form-data", "application/x-www-form")
        ):
            raise HTTPException(400, "form without a non-empty 'file' field")
        else:
            data, filename = await request.body(), request.headers.get("x-filename", "")
        if not data:
            raise HTTPException(
                400, "empty request: send an image as multipart field 'file' or as the raw body"
            )
        try:
            arrays = await run_in_threadpool(model.arrays, data)
        except BadImage as e:
            raise HTTPException(415, f"not a usable image: {e}") from None
        probs, score = await batcher.outputs(arrays)
        ood = None if score is None else np.array([score])
        result = rank([filename], probs[None], {}, model.classes, top_k, ood=ood, threshold=threshold)[0].to_dict()
        result["filename"] = result.pop("path")
        if heatmap and heatmaps is not None:
            result["heatmap"] = await run_in_threadpool(heatmaps.png, data, result["label"])
        return result

    return app


def serve(
    model_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_bytes: int = DEFAULT_MAX_BYTES,
    log_level: str = "info",
    engine: str | None = None,
    ood_threshold: float | None = None,
) -> None:
    """Load ``model_path`` (a run folder's graph on ``engine``) and serve it with uvicorn until interrupted.

    Raises:
        FloristError: the model cannot be loaded, or the address cannot be bound.
    """
    import uvicorn

    model = load_model(model_path, engine)
    app = create_app(model, max_bytes=max_bytes, name=str(model_path), ood_threshold=ood_threshold)
    log.info(
        "serving %s (%s back end, %d classes) on http://%s:%d",
        model_path,
        model.backend,
        len(model.classes),
        host,
        port,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind, after logging why
        server.started = False
    if not server.started:
        raise FloristError(f"could not serve on {host}:{port} (address in use or not allowed?)")
