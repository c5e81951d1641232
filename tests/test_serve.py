"""The HTTP API: endpoints, both back ends, bad input as 4xx JSON, batching off the event loop."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from pathlib import Path

import httpx
import images as im  # tests/images.py
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import florist
from florist.export import GraphClassifier
from florist.runtime import OnnxClassifier
from florist.serve import Batcher, create_app, load_model


@pytest.fixture(scope="module")
def onnx_client(exported_onnx: Path):
    with TestClient(create_app(load_model(exported_onnx), name=str(exported_onnx))) as client:
        yield client


def photo(photos: Path, colour: str, i: int = 0) -> Path:
    return sorted((photos / colour).iterdir())[i]


def test_health_labels_and_page(onnx_client: TestClient) -> None:
    health = onnx_client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "onnx" and health["classes"] == 3
    assert onnx_client.get("/labels").json() == {"labels": ["blue", "green", "red"]}
    page = onnx_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "predict" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    assert "/predict" in onnx_client.get("/openapi.json").json()["paths"]
    assert onnx_client.get("/docs").status_code == 200


def test_predict_multipart_and_raw_body(onnx_client: TestClient, exported_onnx: Path, photos: Path) -> None:
    red = photo(photos, "red")
    response = onnx_client.post("/predict", files={"file": (red.name, red.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == "red" and body["filename"] == red.name
    assert [t["label"] for t in body["top_k"]][0] == "red" and len(body["top_k"]) == 3
    assert sum(t["probability"] for t in body["top_k"]) == pytest.approx(1.0, abs=1e-5)
    blue = photo(photos, "blue")
    raw = onnx_client.post(
        "/predict?top_k=1",
        content=blue.read_bytes(),
        headers={"content-type": "image/jpeg", "x-filename": "b.jpg"},
    ).json()
    assert raw["label"] == "blue" and raw["filename"] == "b.jpg" and len(raw["top_k"]) == 1
    expected = OnnxClassifier(exported_onnx).predict([blue], top_k=1)[0]
    assert raw["probability"] == pytest.approx(expected.probabilities[0], abs=1e-6)


def test_both_back_ends_agree(trained_run: Path, exported_onnx: Path, photos: Path) -> None:
    """PyTorch (run folder) and ONNX Runtime (exported file) give the same answers over HTTP."""
    classifier = florist.load(trained_run, engine="torch")
    for b in classifier.backbones:
        b.bf16 = False  # compare fp32 with fp32 (the run's features may be bf16)
    torch_model = GraphClassifier(classifier)
    assert load_model(trained_run).backend == "openvino", "a run trained on OpenVINO is served by it"
    answers = {}
    for model in (torch_model, load_model(exported_onnx)):
        with TestClient(create_app(model)) as client:
            assert client.get("/health").json()["backend"] == model.backend
            answers[model.backend] = [
                client.post("/predict", files={"file": ("x.jpg", photo(photos, c, 3).read_bytes())}).json()
                for c in ("red", "green", "blue")
            ]
    assert (
        [a["label"] for a in answers["pytorch"]]
        == [a["label"] for a in answers["onnx"]]
        == ["red", "green", "blue"]
    )
    for a, b in zip(answers["pytorch"], answers["onnx"]):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_a_run_folder_answers_with_a_heatmap_when_asked(
    trained_run: Path, onnx_client: TestClient, photos: Path
) -> None:
    """``?heatmap=1``: a run folder adds a base64 PNG of the crop its answer came from; an exported file cannot."""
    red = photo(photos, "red", 2).read_bytes()
    with TestClient(create_app(load_model(trained_run))) as client:
        plain = client.post("/predict", files={"file": ("r.jpg", red)}).json()
        asked = client.post("/predict?heatmap=1", files={"file": ("r.jpg", red)}).json()
        mirrored = Image.open(io.BytesIO(red)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        other = client.post("/predict?heatmap=true", files={"file": ("m.png", im.encode(mirrored))}).json()
    assert "heatmap" not in plain
    assert asked["label"] == plain["label"] == "red" and asked["top_k"] == plain["top_k"]
    side = 160  # the tiny net's input
    with Image.open(io.BytesIO(base64.b64decode(asked["heatmap"]))) as png:
        assert png.format == "PNG" and png.size == (side, side)
        shown = np.asarray(png.convert("RGB"))
    assert shown.std() > 5 and not np.array_equal(shown, np.asarray(Image.open(io.BytesIO(base64.b64decode(other["heatmap"])))))
    onnx = onnx_client.post("/predict?heatmap=1", files={"file": ("r.jpg", red)})
    assert onnx.status_code == 200 and onnx.json()["label"] == "red" and "heatmap" not in onnx.json()


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (
            lambda d: d.joinpath("notes.txt").write_bytes(b"just some text") and d / "notes.txt",
            415,
            "not an image",
        ),
        (lambda d: im.write_truncated_jpeg(d / "cut.jpg", size=(64, 64)), 415, "corrupt"),
        (lambda d: im.write_huge_png_header(d / "bomb.png"), 415, "too many pixels"),
        (lambda d: im.write_text_file(d / "fake.jpg", "<svg xmlns='x'/>"), 415, "not an image"),
    ],
    ids=["text", "truncated", "pixel-bomb", "svg"],
)
def test_bad_images_are_4xx_json(
    onnx_client: TestClient, tmp_path: Path, make, status: int, message: str
) -> None:
    path = make(tmp_path)
    for response in (
        onnx_client.post("/predict", files={"file": (path.name, path.read_bytes())}),
        onnx_client.post("/predict", content=path.read_bytes()),
    ):
        assert response.status_code == status
        assert message in response.json()["error"]


def test_bad_requests_are_4xx_json(onnx_client: TestClient, photos: Path) -> None:
    empty = onnx_client.post("/predict")
    assert empty.status_code == 400 and "empty request" in empty.json()["error"]
    zero = onnx_client.post("/predict", files={"file": ("e.jpg", b"")})
    assert zero.status_code == 400
    bad_k = onnx_client.post("/predict?top_k=0", content=photo(photos, "red").read_bytes())
    assert bad_k.status_code == 422 and "top_k" in bad_k.json()["error"]
    broken = onnx_client.post(
        "/predict",
        content=b"--xyz\r\nContent-Disposition: form-da",
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert 400 <= broken.status_code < 500 and "error" in broken.json()
    missing = onnx_client.get("/nope")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}


def test_body_size_limit(exported_onnx: Path, photos: Path) -> None:
    model = load_model(exported_onnx)
    data = photo(photos, "red").read_bytes()
    with TestClient(create_app(model, max_bytes=len(data) - 1)) as client:
        declared = client.post("/predict", content=data)
        assert declared.status_code == 413 and "limit" in declared.json()["error"]
        chunked = client.post("/predict", content=iter([data[:100], data[100:]]))  # no Content-Length
        assert chunked.status_code == 413 and "limit" in chunked.json()["error"]
        form = client.post("/predict", files={"file": ("a.jpg", data)})
        assert form.status_code == 413
    with TestClient(create_app(model, max_bytes=len(data) + 1000)) as client:
        assert client.post("/predict", content=data).json()["label"] == "red"


class SlowModel:
    """Wraps a model; its first call waits for ``release`` and every call's batch size is recorded."""

    def __init__(self, model):
        self.model = model
        self.classes, self.inputs, self.backend = model.classes, model.inputs, "slow"
        self.max_pixels = model.max_pixels
        self.has_ood, self.ood_threshold = model.has_ood, model.ood_threshold
        self.release = threading.Event()
        self.calls: list[int] = []

    def arrays(self, data: bytes):
        return self.model.arrays(data)

    def outputs_of(self, images):
        self.calls.append(len(images))
        if len(self.calls) == 1:
            assert self.release.wait(30)
        return self.model.outputs_of(images)


def test_requests_queued_while_the_model_runs_are_batched(exported_onnx: Path, photos: Path) -> None:
    slow = SlowModel(load_model(exported_onnx))
    app = create_app(slow)  # type: ignore[arg-type]
    files = [photo(photos, c, i) for c in ("red", "green", "blue") for i in range(2)]

    async def scenario() -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.create_task(client.post("/predict", content=files[0].read_bytes()))
            while not slow.calls:  # the model is now busy with the first image
                await asyncio.sleep(0.01)
            # The event loop is free: other endpoints answer while the model works.
            assert (await client.get("/health")).status_code == 200
            rest = [asyncio.create_task(client.post("/predict", content=f.read_bytes())) for f in files[1:]]
            for _ in range(500):  # wait until all five are queued behind the busy model
                await asyncio.sleep(0.01)
                if app.state.batcher.queued() == len(rest):
                    break
            slow.release.set()
            return [r.json() for r in await asyncio.gather(first, *rest)]

    answers = asyncio.run(scenario())
    assert [a["label"] for a in answers] == [f.parent.name for f in files]
    assert slow.calls == [1, 5]


def test_batcher_reports_model_failures_to_each_request(exported_onnx: Path) -> None:
    class Broken:
        def outputs_of(self, images):
            raise RuntimeError("model exploded")

    async def scenario() -> None:
        batcher = Batcher(Broken())  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.outputs({})
        with pytest.raises(RuntimeError, match="exploded"):  # the worker survived the first failure
            await batcher.outputs({})
        await batcher.stop()

    asyncio.run(scenario())
