"""A real ``florist serve`` process on a free loopback port, for tests that need HTTP over a socket.

    with florist_serve(model_path, "--max-mb", "1") as server:
        httpx.get(f"{server.url}/health")
        psutil.Process(server.process.pid).memory_info().rss

The server's output goes to a temporary file rather than a pipe nobody reads: a
server that logged a lot (tracebacks under load) would otherwise block on a full
pipe and the test would hang instead of failing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class Server:
    """A running ``florist serve``: its process, base URL and everything it printed so far."""

    process: subprocess.Popen
    url: str
    _output: IO[str]

    def output(self) -> str:
        self._output.flush()
        self._output.seek(0)
        return self._output.read()


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def florist_serve(model: str | Path, *args: str, start_timeout: float = 90) -> Iterator[Server]:
    """``florist serve MODEL --port P --quiet ARGS...`` until ``/health`` answers; stopped on exit.

    No ``--host`` is added: the server binds whatever ``florist serve`` binds by default.
    """
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "florist", "serve", str(model), "--port", str(port), "--quiet", *args]
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        server = Server(process, f"http://127.0.0.1:{port}", output)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                try:
                    if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"florist serve did not start: {server.output()[-2000:]}")
                time.sleep(0.2)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
