"""End to end: `florist serve` on loopback, its page driven in headless Chromium.

Needs the Python package ``playwright`` (test extra) and Debian's ``chromium`` at
/usr/bin/chromium (``apt-get install -y chromium``; ``$FLORIST_CHROMIUM`` names
another binary). Playwright's own browser download is never used. Without them
the tests skip, except under CI (``CI`` set), where they fail. Screenshots go to
``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import images as im  # tests/images.py
import pytest
from servers import florist_serve  # tests/servers.py

from florist.report import CHROMIUM_FLAGS

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path(os.environ.get("FLORIST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = list(CHROMIUM_FLAGS)  # the switches report screenshots use: headless, no network


def _require_browser() -> None:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the playwright package is not installed (pip install -e '.[test]')"
    if reason is None and not CHROMIUM.is_file():
        reason = f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set FLORIST_CHROMIUM)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def server(exported_onnx: Path) -> Iterator[str]:
    """`florist serve model.onnx` in a subprocess on a free loopback port; yields its base URL."""
    with florist_serve(exported_onnx) as running:
        yield running.url


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def new_page(browser):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.set_default_timeout(30_000)
    return page


@pytest.fixture(scope="module")
def page(server: str, browser):
    return new_page(browser)


@pytest.fixture(scope="module")
def run_server(trained_run: Path) -> Iterator[str]:
    """`florist serve RUN_FOLDER`: the back end that can draw heatmaps."""
    with florist_serve(trained_run) as running:
        yield running.url


def open_page(page, server: str) -> None:
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('3 classes')")


def shown_result(page) -> tuple[str, list[tuple[str, str]]]:
    """The top label and the (label, percentage) of each bar, as rendered."""
    page.wait_for_selector("#top-label")
    rows = page.query_selector_all("#results .row")
    return page.inner_text("#top-label"), [
        (row.get_attribute("data-label"), row.query_selector(".pct").inner_text()) for row in rows
    ]


def test_page_classifies_a_picked_photo(page, server: str, photos: Path) -> None:
    open_page(page, server)
    page.set_input_files("#file", str(sorted((photos / "red").iterdir())[0]))
    top, bars = shown_result(page)
    assert top == "red"
    assert [label for label, _ in bars][0] == "red" and len(bars) == 3
    assert page.evaluate("document.getElementById('preview').naturalWidth") > 0  # the photo is shown
    assert not page.is_visible("#heatmap")  # an exported model has no gradients: no heatmap, no error
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)


def test_page_shows_the_heatmap_of_a_run_folders_answer(browser, run_server: str, photos: Path) -> None:
    page = new_page(browser)
    open_page(page, run_server)
    page.set_input_files("#file", str(sorted((photos / "blue").iterdir())[0]))
    top, _ = shown_result(page)
    assert top == "blue"
    page.wait_for_function("document.getElementById('heatmap').complete && document.getElementById('heatmap').naturalWidth > 0")
    assert page.is_visible("#heatmap")
    size = page.evaluate("[document.getElementById('heatmap').naturalWidth, document.getElementById('heatmap').naturalHeight]")
    assert size == [160, 160]  # the tiny net's centre crop, decoded by the browser
    assert "blue" in page.inner_text("#heat-caption")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-page-heatmap.png"), full_page=True)
    first = page.get_attribute("#heatmap", "src")
    page.set_input_files("#file", str(sorted((photos / "red").iterdir())[0]))
    page.wait_for_function("document.getElementById('heat-caption').textContent.includes('red')")
    assert page.inner_text("#top-label") == "red" and page.get_attribute("#heatmap", "src") != first
    page.close()


def test_page_classifies_a_dropped_real_flower(page, server: str, flower_photos: Path) -> None:
    photo = sorted((flower_photos / "sunflowers").glob("*.jpg"))[0]
    expected = httpx.post(
        f"{server}/predict?top_k=5", files={"file": (photo.name, photo.read_bytes())}
    ).json()
    open_page(page, server)
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, { type: "image/jpeg" }));
            const drop = document.getElementById("drop");
            for (const type of ["dragenter", "dragover", "drop"]) {
                drop.dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true }));
            }
        }""",
        [base64.b64encode(photo.read_bytes()).decode(), photo.name],
    )
    top, bars = shown_result(page)
    assert top == expected["label"]
    assert bars == [(t["label"], f"{t['probability'] * 100:.1f}%") for t in expected["top_k"]]
    assert photo.name in page.inner_text("#status")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-page-flower.png"), full_page=True)


def test_page_explains_a_file_that_is_not_an_image(page, server: str, tmp_path: Path) -> None:
    open_page(page, server)
    page.set_input_files("#file", str(im.write_text_file(tmp_path / "notes.jpg")))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "not a usable image" in page.inner_text("#error")
    assert page.query_selector_all("#results .row") == []


def test_report_heatmaps_decode_in_chromium(browser, mixed_run: Path) -> None:
    page = new_page(browser)
    page.goto((mixed_run / "report.html").resolve().as_uri())
    sizes = page.eval_on_selector_all(
        "img.heatmap", "images => images.map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert sizes, "the misclassified eval images should have heatmaps"
    assert all(done and w > 0 and h > 0 for done, w, h in sizes)
    assert page.is_visible("#calibration") and page.eval_on_selector(
        'img[alt="reliability diagram"]', "i => i.naturalWidth"
    ) > 0
    page.close()
