"""agpctl report on a real trained run, opened in a real headless Chromium.

The test starts Chromium itself (own temporary profile, own process group, stopped at the
end) and drives it over the DevTools protocol: the page loads from file:// with no network
request, no failed request and no error, every <img> decodes, and a screenshot of the whole
page is far from blank. Skipped only when no Chromium is installed (``make test`` installs
Debian's when run as root)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from agpctl import runs
from agpctl.cli import cli

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
STARTUP_SECONDS = 60
LOAD_SECONDS = 60


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class DevTools:
    """A page of a headless Chromium we started, driven over the DevTools protocol; events
    are kept in arrival order."""

    def __init__(self, browser: str, profile: Path) -> None:
        import websocket  # test-only dependency (the `test` extra)

        self.process = subprocess.Popen(
            [browser, "--headless", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             # The sandbox needs user namespaces, which containers and root often lack; the
             # page is our own file.
             "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends exactly what it started
        )
        try:
            port = self._port(profile / "DevToolsActivePort")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                page = next(t for t in json.load(answer) if t["type"] == "page")
            self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=LOAD_SECONDS,
                                                      suppress_origin=True)
        except BaseException:
            self.stop()
            raise
        self.events: list[dict] = []
        self._next_id = 0

    def _port(self, port_file: Path) -> int:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self.process.returncode} at start-up")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium did not open its DevTools port within {STARTUP_SECONDS} s")

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + LOAD_SECONDS
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            self.events.append(message)
            if message.get("method") == event:
                return message
        raise TimeoutError(f"no {event} within {LOAD_SECONDS} s")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"]["value"]

    def named(self, method: str) -> list[dict]:
        return [e["params"] for e in self.events if e.get("method") == method]

    def stop(self) -> None:
        socket = getattr(self, "socket", None)
        if socket is not None:
            socket.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        try:  # helpers left in the group after the main process ended
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def chromium(tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)}): apt-get install chromium")
    tools = DevTools(browser, tmp_path / "chromium-profile")
    try:
        yield tools
    finally:
        tools.stop()


def assert_same_table(table: dict, expected: dict) -> None:
    assert set(table) == set(expected)
    for name, row in expected.items():
        assert table[name] == pytest.approx(row, nan_ok=True), name


def make_report(run: str, out: Path | str, *extra: str) -> dict:
    result = CliRunner().invoke(cli, ["report", "--run", run, "--out", str(out), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_report_of_a_trained_run_in_chromium(trained_run, tmp_path, chromium) -> None:
    out = tmp_path / "report.html"
    started = time.perf_counter()
    answer = make_report(trained_run, out)
    seconds = time.perf_counter() - started
    assert answer["report"] == str(out) and answer["bytes"] == out.stat().st_size
    # The test split evaluated again gives the table training wrote.
    assert_same_table(answer["metrics"], runs.read_metrics(trained_run))
    assert set(answer["thresholds"]) == {"fabric", "metal"}
    print(f"report: {out.stat().st_size / 1e3:.0f} kB in {seconds:.1f} s")

    chromium.call("Page.enable")
    chromium.call("Network.enable")
    chromium.call("Runtime.enable")
    chromium.call("Log.enable")
    chromium.call("Page.navigate", url=out.as_uri())
    chromium.wait_for("Page.loadEventFired")

    requested = [r["request"]["url"] for r in chromium.named("Network.requestWillBeSent")]
    assert requested and requested[0] == out.as_uri()
    assert all(url.startswith(("file:", "data:")) for url in requested), requested
    assert not [url for url in requested if url.startswith("file:") and url != out.as_uri()]
    assert chromium.named("Network.loadingFailed") == []
    assert chromium.named("Runtime.exceptionThrown") == []
    assert [e for e in chromium.named("Log.entryAdded") if e["entry"]["level"] == "error"] == []
    assert [e for e in chromium.named("Runtime.consoleAPICalled") if e["type"] == "error"] == []

    assert chromium.evaluate("document.readyState") == "complete"
    images = chromium.evaluate("Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) >= 5 + 2 + 1 + 2 * 4  # curves, histograms, colour bar, an example per category
    assert all(complete and width > 0 for _, complete, width in images), images
    sections = chromium.evaluate("Array.from(document.querySelectorAll('section'), s => s.id)")
    assert sections == ["configuration", "metrics", "curves", "histograms", "history", "examples"]

    layout = chromium.call("Page.getLayoutMetrics")["cssContentSize"]
    shot = chromium.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": layout["width"], "height": layout["height"], "scale": 1})
    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    assert picture.height > 2000  # the whole page, not one screen
    colours = picture.getcolors(maxcolors=1 << 24)
    assert len(colours) > 2000, f"{len(colours)} distinct colours: the screenshot looks blank"
    white = sum(count for count, colour in colours if colour == (255, 255, 255))
    assert white < 0.9 * picture.width * picture.height


def test_report_from_saved_maps_matches(trained_run, tmp_path) -> None:
    maps = tmp_path / "maps.npz"
    result = CliRunner().invoke(cli, ["eval", "--run", trained_run, "--save-maps", str(maps), "--json"])
    assert result.exit_code == 0, result.output
    answer = make_report(trained_run, tmp_path / "from-maps.html", "--from-maps", str(maps))
    assert answer["checkpoints"] == []  # no model was loaded
    assert_same_table(answer["metrics"], json.loads(result.stdout)["metrics"])
    page = (tmp_path / "from-maps.html").read_text()
    assert "saved predictions" in page and "the model was not run" in page


def test_report_of_an_s3_run(trained_run, s3_bucket, tmp_path) -> None:
    from agp_data import storage

    run = f"s3://{s3_bucket}/runs/tiny"
    storage.upload_dir(trained_run, run)
    refused = CliRunner().invoke(cli, ["report", "--run", run])
    assert refused.exit_code == 2 and "--out is required for the s3:// run" in refused.output
    out = f"s3://{s3_bucket}/reports/tiny.html"
    answer = make_report(run, out)
    page = storage.read_bytes(out)
    assert answer["report"] == out and answer["bytes"] == len(page)
    assert_same_table(answer["metrics"], runs.read_metrics(trained_run))
    assert b'<section id="examples">' in page and b"data:image/jpeg;base64," in page
