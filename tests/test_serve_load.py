"""``florist serve`` under load: a real server process on loopback, a few thousand mixed requests.

The server is what ``florist serve`` starts (uvicorn, default host), with a 1 MB body
limit so that over-limit requests stay cheap. A few client threads with keep-alive
connections post good photos and every kind of bad body. Nothing may fail: every good
photo gets 200, every bad body its 4xx, no 5xx, no connection error, no traceback in
the server's output, and the server's resident memory stays flat from the first half
of the requests to the second.

The model is a florist run on timm's tiny ``test_resnet`` (random weights, 0.4 M
parameters) so that the test measures the server, not the network: with
EfficientNet-Lite0 a few thousand requests would take minutes on two cores.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import images as im  # tests/images.py
import numpy as np
import psutil
import pytest
from conftest import seeded_weights
from PIL import Image
from servers import florist_serve  # tests/servers.py

import florist
from florist.export import export

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

#: Requests measured (plus a warm-up), split into two halves whose memory is compared.
REQUESTS = 2000
CLIENTS = 4
#: Largest growth of the server's RSS from the first half to the second. Measured: under
#: 5 MiB. Keeping each good request's 60 KB upload (a deliberate leak, tried once) grows it
#: by 50 MiB; keeping its preprocessed 300 KB array or decoded picture would grow it more.
MAX_RSS_GROWTH = 30 * 2**20
MIB = 2**20


@pytest.fixture(scope="module")
def tiny_onnx(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A florist run on a tiny random timm network (weights from a local file), exported to ONNX."""
    folder = tmp_path_factory.mktemp("tiny")
    weights = seeded_weights("test_resnet", folder / "test_resnet.safetensors")
    run = folder / "run"
    florist.train(photos, run, backbone="test_resnet", weights=str(weights),
                  mode="head", epochs=2, eval_fraction=0.25, tta=False)
    export(run, folder / "tiny.onnx", check_images=2)
    return folder / "tiny.onnx"


def photo(seed: int) -> bytes:
    """A 640x480 JPEG (about 60 KB): smooth colours plus noise, like a small camera photo."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    pixels = np.clip(np.asarray(base) + rng.normal(0, 8, (480, 640, 3)), 0, 255).astype(np.uint8)
    return im.encode(Image.fromarray(pixels), "JPEG", quality=85)


def bodies(tmp_path: Path) -> tuple[list[bytes], list[tuple[bytes, int]]]:
    """Good photos, and bad bodies with the status each must get."""
    good = [photo(seed) for seed in range(8)]
    bad = [
        (b"just some text, not a picture", 415),
        (good[0][: len(good[0]) // 2], 415),  # truncated
        (im.write_corrupt_jpeg(tmp_path / "corrupt.jpg").read_bytes(), 415),
        (im.write_huge_png_header(tmp_path / "bomb.png").read_bytes(), 415),  # 30000x30000 claimed
        (b"", 400),
        (b"\xff\xd8\xff" + bytes(1_100_000), 413),  # over the 1 MB limit
    ]
    return good, bad


class Load:
    """Posts request ``i`` of a fixed mix (every fifth a bad body) from a few threads; tallies outcomes."""

    def __init__(self, url: str, good: list[bytes], bad: list[tuple[bytes, int]], classes: set[str]):
        self.url, self.good, self.bad, self.classes = url, good, bad, classes
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def body(self, i: int) -> tuple[bytes, int]:
        if i % 5 == 4:
            return self.bad[(i // 5) % len(self.bad)]
        return self.good[i % len(self.good)], 200

    def _client(self, ids: range) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            for i in ids:
                data, want = self.body(i)
                try:
                    response = client.post("/predict", content=data)
                    body = response.json()
                    ok = response.status_code == want and (
                        body.get("label") in self.classes if want == 200 else bool(body.get("error"))
                    )
                    outcome = str(response.status_code)
                except (httpx.HTTPError, ValueError) as e:  # connection errors, a body that is not JSON
                    ok, outcome = False, type(e).__name__
                with self._lock:
                    self.outcomes[outcome] += 1
                    if not ok:
                        self.failures.append(f"request {i}: expected {want}, got {outcome}")

    def run(self, start: int, stop: int) -> float:
        """Requests ``start..stop-1`` from :data:`CLIENTS` threads; the seconds they took."""
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            for future in [pool.submit(self._client, range(start + k, stop, CLIENTS)) for k in range(CLIENTS)]:
                future.result()
        return time.perf_counter() - started


def test_thousands_of_mixed_requests(tiny_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="httpx")  # not a log record per request in this process
    good, bad = bodies(tmp_path)
    with florist_serve(tiny_onnx, "--max-mb", "1") as server:
        process = psutil.Process(server.process.pid)
        listening = [c.laddr for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}, "binds loopback only by default"

        classes = set(httpx.get(f"{server.url}/labels").json()["labels"])
        load = Load(server.url, good, bad, classes)
        load.run(0, 200)  # warm-up: thread pools, ONNX Runtime's arena at its largest batch
        rss = [process.memory_info().rss]
        half = REQUESTS // 2
        seconds = load.run(200, 200 + half)
        rss.append(process.memory_info().rss)
        seconds += load.run(200 + half, 200 + REQUESTS)
        rss.append(process.memory_info().rss)
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        output = server.output()

    print(
        f"\nload: {REQUESTS} requests ({CLIENTS} clients) in {seconds:.1f} s = {REQUESTS / seconds:.0f} req/s; "
        f"server RSS after warm-up / first half / second half: {' / '.join(f'{r / MIB:.1f}' for r in rss)} MiB; "
        f"outcomes {dict(sorted(load.outcomes.items()))}"
    )
    assert load.failures == [], load.failures[:10]
    assert not any(status.startswith("5") for status in load.outcomes)
    assert sum(load.outcomes.values()) == REQUESTS + 200
    assert "Traceback" not in output and "ERROR" not in output, output[-3000:]
    assert rss[2] - rss[1] < MAX_RSS_GROWTH, f"server memory grew {(rss[2] - rss[1]) / MIB:.1f} MiB"
