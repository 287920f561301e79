"""The page of ``compress-edge serve`` in a real browser: Debian's headless Chromium (no browser download),
driven over the Chrome DevTools Protocol with the ``websockets`` package. It loads the page, submits an
image through the file input, and the neighbours and the vote appear in the DOM; a click on a gallery
image searches by id. A screenshot is saved in the test's folder and, when COMPRESS_EDGE_ARTIFACTS is
set, copied there."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cli_helpers import stop_process

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).is_file()), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install "
                                                         "chromium; run.sh installs it when missing)")


def _helpers():
    """tests/test_serve.py's server helpers (test modules are not importable by name here)."""
    spec = importlib.util.spec_from_file_location("serve_helpers", Path(__file__).with_name("test_serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Browser:
    """Headless Chromium with a DevTools websocket to its one page."""

    def __init__(self, profile: Path, timeout: float = 60.0) -> None:
        sync_client = pytest.importorskip("websockets.sync.client")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1280,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"chromium did not start: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                pages = [t for t in json.loads(response.read()) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert pages, "chromium shows no page"
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(sync_client.connect(pages[0]["webSocketDebuggerUrl"], max_size=None,
                                                                open_timeout=timeout))
        self.ids = itertools.count(1)
        self.errors: list[str] = []

    def call(self, method: str, timeout: float = 60.0, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(message["params"]["exceptionDetails"])[:500])
            elif message.get("method") == "Runtime.consoleAPICalled" and message["params"]["type"] == "error":
                self.errors.append(json.dumps(message["params"]["args"])[:500])
            if message.get("id") == msg_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        status = self.evaluate("document.getElementById('status').textContent")
        raise AssertionError(f"timed out waiting for {expression}; page errors: {self.errors}; status: {status!r}")

    def screenshot(self, out: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        stack = getattr(self, "_stack", None)
        if stack is not None:
            stack.close()
        stop_process(self.proc)


def _keep(path: Path) -> None:
    folder = os.environ.get("COMPRESS_EDGE_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(folder) / path.name)


@pytest.mark.slow
def test_the_page_finds_neighbours_in_a_real_browser(tmp_path, make_images):
    from compress_edge.retrieval.index import build_from_images

    helpers = _helpers()
    classes = ("circle", "square", "stripes")
    gallery = make_images(tmp_path / "gallery", classes=classes, per_class=8, size=32)
    queries = make_images(tmp_path / "queries", classes=classes, per_class=1, size=32, seed=11)
    onnx = helpers.export_model(tmp_path / "student.onnx", seed=2)
    build_from_images(str(onnx), [str(gallery)], tmp_path / "index", queries=0, tune=False)
    server = helpers.Server(tmp_path / "index")
    (tmp_path / "profile").mkdir()
    browser = None
    try:
        browser = Browser(tmp_path / "profile")
        browser.call("Runtime.enable")
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait_for("document.querySelectorAll('#gallery .tile img').length === 24")
        about = browser.evaluate("document.getElementById('about').textContent")
        assert "24 images" in about and "mobilenet_v3_small" in about

        # pick a file: the file input's change event sends it to POST /search
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.evaluate("document.getElementById('k').value = '6'")
        query = queries / "stripes" / "stripes_000.png"
        browser.call("DOM.setFileInputFiles", files=[str(query)], nodeId=node)
        browser.wait_for("document.querySelectorAll('#neighbours .neighbour').length === 6")
        labels = browser.evaluate("[...document.querySelectorAll('#neighbours .neighbour .label')]"
                                  ".map(e => e.textContent)")
        assert labels[0] == "stripes", labels
        vote = browser.evaluate("document.getElementById('vote').textContent")
        assert "kNN vote: stripes" in vote
        timings = browser.evaluate("document.getElementById('timings').textContent")
        assert "embed" in timings and "search" in timings and "ms" in timings
        browser.wait_for("[...document.querySelectorAll('#neighbours img')].every(i => i.complete && "
                         "i.naturalWidth > 0)")
        shot = browser.screenshot(tmp_path / "serve-page.png")
        _keep(shot)
        assert shot.stat().st_size > 10_000

        # click a gallery image: a search by id
        browser.evaluate("document.querySelector('#gallery .tile[data-id=\"3\"]').click()")
        browser.wait_for("document.getElementById('timings').textContent.includes('embed: stored')")
        ids = browser.evaluate("[...document.querySelectorAll('#neighbours .neighbour')].map(e => e.dataset.id)")
        assert len(ids) == 6 and "3" not in ids
        shot = browser.screenshot(tmp_path / "serve-page-gallery-click.png")
        _keep(shot)
        assert not browser.errors, browser.errors
    finally:
        if browser is not None:
            browser.close()
        server.stop()
