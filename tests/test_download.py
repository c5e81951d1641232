"""Dataset download: checksums, resume, safe extraction, reuse, against a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from florist.download import Archive, download, fetch, safe_extract
from florist.errors import FloristError


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path / "florist-cache"))
    monkeypatch.setenv("FLORIST_DATA", str(tmp_path / "florist-data"))


class _Server:
    """A tiny static file server on 127.0.0.1 that honours ``Range: bytes=N-``."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
                file = server.root / self.path.lstrip("/")
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def url(self, name: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=10)
            self.running = False


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    s = _Server(root)
    yield s
    s.stop()


def _png(colour, seed) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.integers(-30, 31, size=(12, 16, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def photos_tarball(server) -> tuple[Archive, dict[str, bytes]]:
    """A gzip tarball of class folders under ``photos/``, served by ``server``."""
    files = {
        f"photos/{cls}/{i}.png": _png(colour, 10 * k + i)
        for k, (cls, colour) in enumerate({"red": (200, 30, 30), "blue": (30, 30, 200)}.items())
        for i in range(3)
    }
    path = server.root / "photos.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            _add_bytes(tar, name, data)
    data = path.read_bytes()
    archive = Archive(
        url=server.url("photos.tgz"), size=len(data), sha256=hashlib.sha256(data).hexdigest(), folder="photos"
    )
    return archive, files


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_download_verifies_and_extracts(server, photos_tarball, tmp_path):
    archive, files = photos_tarball
    dest = tmp_path / "data"
    seen = []
    folder = download(archive, dest, progress=lambda done, total: seen.append((done, total)))
    assert folder == dest / "photos"
    assert {f"photos/{k}": v for k, v in _tree(folder).items()} == files
    assert sorted(p.name for p in folder.iterdir()) == ["blue", "red"]
    assert not list(dest.glob("*.part"))
    assert not list(dest.glob(".extract-*"))
    assert seen and seen[-1] == (archive.size, archive.size)
    assert len(server.requests) == 1 and server.requests[0]["range"] == ""


def test_second_download_reuses_the_folder_offline(server, photos_tarball, tmp_path):
    archive, files = photos_tarball
    dest = tmp_path / "data"
    folder = download(archive, dest)
    server.stop()
    (dest / "photos.tgz").unlink()  # not even the tarball is needed
    assert download(archive, dest) == folder
    assert len(_tree(folder)) == len(files)


def test_download_default_destination_uses_florist_data(server, photos_tarball, tmp_path):
    archive, _ = photos_tarball
    assert download(archive) == tmp_path / "florist-data" / "photos"


def test_wrong_checksum_is_refused(server, photos_tarball, tmp_path):
    archive, _ = photos_tarball
    wrong = Archive(archive.url, archive.size, "0" * 64, archive.folder)
    dest = tmp_path / "data"
    with pytest.raises(FloristError, match="does not match"):
        download(wrong, dest)
    assert not (dest / "photos").exists()
    assert not (dest / "photos.tgz").exists()
    assert not (dest / "photos.tgz.part").exists()


def test_wrong_size_is_refused(server, photos_tarball, tmp_path):
    archive, _ = photos_tarball
    dest = tmp_path / "data"
    with pytest.raises(FloristError):
        download(Archive(archive.url, archive.size - 1, archive.sha256, archive.folder), dest)
    assert not (dest / "photos").exists()
    assert not (dest / "photos.tgz").exists()


def test_resume_from_partial_file(server, photos_tarball, tmp_path):
    archive, files = photos_tarball
    dest = tmp_path / "data"
    dest.mkdir()
    data = (server.root / "photos.tgz").read_bytes()
    half = len(data) // 2
    (dest / "photos.tgz.part").write_bytes(data[:half])
    folder = download(archive, dest)
    assert (dest / "photos.tgz").read_bytes() == data
    assert server.requests[-1]["range"] == f"bytes={half}-"
    assert {f"photos/{k}": v for k, v in _tree(folder).items()} == files


def test_complete_partial_file_needs_no_request(server, photos_tarball, tmp_path):
    """A download killed after the last byte but before the rename must not fail forever (HTTP 416)."""
    archive, _ = photos_tarball
    dest = tmp_path / "data"
    dest.mkdir()
    data = (server.root / "photos.tgz").read_bytes()
    (dest / "photos.tgz.part").write_bytes(data)
    assert fetch(archive, dest) == dest / "photos.tgz"
    assert (dest / "photos.tgz").read_bytes() == data
    assert server.requests == []


def test_server_that_ignores_range_restarts(server, photos_tarball, tmp_path, monkeypatch):
    archive, _ = photos_tarball
    dest = tmp_path / "data"
    dest.mkdir()
    data = (server.root / "photos.tgz").read_bytes()
    (dest / "photos.tgz.part").write_bytes(b"x" * 10)  # garbage a plain 200 must overwrite
    import urllib.request

    real = urllib.request.Request

    def no_range(url, headers=None, **kw):
        return real(url, headers={}, **kw)

    monkeypatch.setattr(urllib.request, "Request", no_range)
    assert fetch(archive, dest).read_bytes() == data


def test_interrupted_transfer_keeps_partial_for_resume(server, photos_tarball, tmp_path):
    archive, _ = photos_tarball
    data = (server.root / "photos.tgz").read_bytes()
    full = server.root / "photos.tgz"
    full.write_bytes(data[: len(data) // 3])  # server now sends a short file
    dest = tmp_path / "data"
    with pytest.raises(FloristError, match="resume"):
        fetch(archive, dest)
    assert (dest / "photos.tgz.part").read_bytes() == data[: len(data) // 3]
    full.write_bytes(data)  # the next run resumes and completes
    assert fetch(archive, dest).read_bytes() == data
    assert server.requests[-1]["range"] == f"bytes={len(data) // 3}-"


def test_network_failure_is_a_florist_error(tmp_path):
    archive = Archive("http://127.0.0.1:9/none.tgz", 10, "0" * 64, "none")  # port 9: discard, closed
    with pytest.raises(FloristError, match="failed"):
        fetch(archive, tmp_path / "data", timeout=5)


def test_missing_file_on_server(server, tmp_path):
    archive = Archive(server.url("absent.tgz"), 10, "0" * 64, "absent")
    with pytest.raises(FloristError):
        download(archive, tmp_path / "data")


# ---------------------------------------------------------------------------
# Safe extraction
# ---------------------------------------------------------------------------


def _write_tar(path: Path, members: list[tuple[str, str, str | bytes]]) -> Path:
    """members: (kind, name, payload) where kind is "file", "symlink" or "hardlink"."""
    with tarfile.open(path, "w") as tar:
        for kind, name, payload in members:
            if kind == "file":
                _add_bytes(tar, name, payload if isinstance(payload, bytes) else payload.encode())
            else:
                info = tarfile.TarInfo(name)
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = payload
                tar.addfile(info)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A destination folder nested inside a watched folder, so writes outside it can be seen."""
    outer = tmp_path / "outer"
    dest = outer / "dest"
    outer.mkdir()
    return outer, dest


def _outside_files(outer: Path, dest: Path) -> list[Path]:
    return [p for p in outer.rglob("*") if dest not in p.parents and p != dest]


@pytest.mark.parametrize(
    "members",
    [
        [("file", "photos/ok.txt", "fine"), ("file", "../evil.txt", "evil")],
        [("file", "photos/ok.txt", "fine"), ("file", "photos/../../evil.txt", "evil")],
        [("file", "photos/ok.txt", "fine"), ("file", "ABSOLUTE", "evil")],
        [("file", "photos/ok.txt", "fine"), ("symlink", "photos/link", "../../evil.txt")],
        [("symlink", "photos/link", "ABSOLUTE")],
        [("file", "photos/ok.txt", "fine"), ("hardlink", "photos/hard", "ABSOLUTE")],
        [
            ("file", "photos/ok.txt", "fine"),
            ("file", "../evil.txt", "evil"),
            ("file", "ABSOLUTE", "evil"),
            ("symlink", "photos/link", "../../evil.txt"),
        ],
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-abs", "all"],
)
def test_malicious_tarball_is_refused(members, sandbox, tmp_path):
    outer, dest = sandbox
    absolute = tmp_path / "abs-target" / "evil.txt"  # an absolute path inside tmp, never /tmp itself
    fill = str(absolute)
    members = [(k, n.replace("ABSOLUTE", fill), p.replace("ABSOLUTE", fill)) for k, n, p in members]
    tarball = _write_tar(tmp_path / "evil.tar", members)
    with pytest.raises(FloristError, match="unsafe|absolute"):
        safe_extract(tarball, dest)
    assert not absolute.exists() and not absolute.parent.exists()
    assert _outside_files(outer, dest) == []
    assert not (tmp_path / "evil.txt").exists()
    assert list(dest.iterdir()) == []  # nothing half-extracted is left behind


def test_malicious_tarball_through_download(server, tmp_path):
    members = [("file", "photos/a.txt", "a"), ("file", "../evil.txt", "x")]
    tarball = _write_tar(server.root / "evil.tar", members)
    data = tarball.read_bytes()
    archive = Archive(server.url("evil.tar"), len(data), hashlib.sha256(data).hexdigest(), "photos")
    dest = tmp_path / "outer" / "dest"
    with pytest.raises(FloristError):
        download(archive, dest)
    assert not (dest / "photos").exists()
    assert not (tmp_path / "outer" / "evil.txt").exists()


def test_oversized_archive_is_refused(sandbox, tmp_path):
    outer, dest = sandbox
    members = [("file", "photos/a.bin", b"a" * 600), ("file", "photos/b.bin", b"b" * 600)]
    tarball = _write_tar(tmp_path / "big.tar", members)
    with pytest.raises(FloristError, match="limit"):
        safe_extract(tarball, dest, max_bytes=1000)
    assert list(dest.iterdir()) == []
    safe_extract(tarball, dest, max_bytes=1200)  # exactly at the limit is fine
    assert (dest / "photos" / "a.bin").read_bytes() == b"a" * 600


def test_inside_symlink_is_allowed(sandbox, tmp_path):
    outer, dest = sandbox
    tarball = _write_tar(
        tmp_path / "ok.tar", [("file", "photos/a.txt", "hello"), ("symlink", "photos/alias.txt", "a.txt")]
    )
    safe_extract(tarball, dest)
    assert (dest / "photos" / "alias.txt").read_text() == "hello"
    assert _outside_files(outer, dest) == []


def test_corrupt_archive_is_a_florist_error(sandbox, tmp_path):
    _, dest = sandbox
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(FloristError, match="cannot read"):
        safe_extract(bad, dest)
    assert list(dest.iterdir()) == []


def test_archive_without_the_expected_folder(server, tmp_path):
    tarball = _write_tar(server.root / "other.tar", [("file", "other/a.txt", "a")])
    data = tarball.read_bytes()
    archive = Archive(server.url("other.tar"), len(data), hashlib.sha256(data).hexdigest(), "photos")
    with pytest.raises(FloristError, match="photos"):
        download(archive, tmp_path / "data")
