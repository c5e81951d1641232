"""Throughput and latency of ``florist serve`` on loopback, per back end.

Back ends: the run folder on ``--engine torch`` and on ``--engine openvino``, and its
fp32 ONNX export (ONNX Runtime). Protocol: the server runs in its own process
(``florist serve MODEL --port P``);
a client posts real photos (JPEG bytes, raw body) from the run's eval split,
round-robin, from 1 and then 8 threads (keep-alive connections), after a few
warm-up requests. Requests/s is completed requests over wall time; latency is
per request, as the client sees it (upload, decode, preprocessing, model, JSON);
``server_rss_mib`` is the server process's resident memory after each row.
Client and server share the machine's CPUs.

Writes ``bench/results/serve.json`` and the table between README.md's ``serve-table`` markers.

    python bench/serve.py runs/flowers                       # exports runs/flowers to ONNX first
    python bench/serve.py runs/flowers --requests 200 --concurrency 1,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
from readme_table import run_facts, write_results  # bench/readme_table.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serve.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    """``florist serve model FLAGS`` on a free loopback port, once /health answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "florist", "serve", str(model), *flags, "--port", str(port), "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server for {model} exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"server for {model} did not start in 120 s")


def run_load(url: str, images: list[bytes], requests: int, concurrency: int) -> dict:
    """Post ``requests`` images from ``concurrency`` threads; requests/s and latency percentiles."""
    local = threading.local()
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []

    def worker() -> None:
        local.client = httpx.Client(timeout=120)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            started = time.perf_counter()
            response = local.client.post(f"{url}/predict", content=images[i % len(images)])
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            with lock:
                latencies.append(elapsed)
        local.client.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "mean_ms": round(float(ms.mean()), 1),
    }


def eval_images(run: Path, n: int) -> list[bytes]:
    """Up to ``n`` real photos spread over the run's eval split."""
    from florist.data import read_labels, read_manifest

    items = read_manifest(run / "eval.csv", read_labels(run))
    picked = items[:: max(1, len(items) // n)][:n]
    return [Path(it.path).read_bytes() for it in picked]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a trained run folder")
    parser.add_argument("--onnx", type=Path, help="its ONNX export (default: exported now to a temp folder)")
    parser.add_argument("--requests", type=int, default=64, help="requests per back end and concurrency")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated client thread counts")
    parser.add_argument("--images", type=int, default=32, help="distinct photos to cycle through")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from florist.export import export

    images = eval_images(args.run, args.images)
    with tempfile.TemporaryDirectory(prefix="florist-bench-") as tmp:
        onnx_path = args.onnx
        if onnx_path is None:
            onnx_path = Path(tmp) / "model.onnx"
            export(args.run, onnx_path, check_images=4)
        results = []
        backends = [
            ("torch (run folder)", args.run, ["--engine", "torch"]),
            ("OpenVINO (run folder)", args.run, ["--engine", "openvino"]),
            ("ONNX Runtime (fp32 export)", onnx_path, []),
        ]
        for backend, model, flags in backends:
            process, url = start_server(model, flags)
            server = psutil.Process(process.pid)
            try:
                run_load(url, images, 4, 1)  # warm-up
                for c in (int(x) for x in args.concurrency.split(",")):
                    row = {"backend": backend, **run_load(url, images, args.requests, c)}
                    row["server_rss_mib"] = round(server.memory_info().rss / 2**20, 1)  # after the row
                    print(json.dumps(row))
                    results.append(row)
            finally:
                process.terminate()
                process.wait(timeout=30)
    report = {
        **run_facts(args.run),
        "images": len(images),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "results": results,
    }
    write_results(report, args.out, RESULTS, "serve-table", table(report), ROOT / "README.md")


def table(report: dict) -> str:
    """Markdown table for the README, with each back end's requests/s against torch's at the same load."""
    rows = report["results"]
    torch_rate = {r["concurrency"]: r["requests_per_s"] for r in rows if r["backend"].startswith("torch")}
    lines = ["| back end | clients | requests/s | vs torch | p50 | p99 |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["requests_per_s"] / torch_rate[r["concurrency"]] if r["concurrency"] in torch_rate else float("nan")
        lines.append(
            f"| {r['backend']} | {r['concurrency']} | {r['requests_per_s']:.1f} | {ratio:.2f}x "
            f"| {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
