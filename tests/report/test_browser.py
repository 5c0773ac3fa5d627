"""The HTML report in a real browser: headless Chromium, driven over the DevTools protocol.

The page must load with no console error and no uncaught exception, draw every chart (each SVG
has a non-zero size on screen), and make no network request: the report is self-contained.

Chromium is spoken to through `--remote-debugging-pipe` (stdlib only): commands go in on the
child's fd 3 and replies and events come out on its fd 4, one JSON message per NUL-terminated
frame. Where Chromium is not installed the tests are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((found for name in CANDIDATES if (found := shutil.which(name))), None)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-pipe",
    "--window-size=1200,900",
)
TIMEOUT = 30.0
SETTLE = 0.5  # seconds of quiet after the load event, for late console messages and requests

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install chromium); the browser test needs it",
)


@dataclass
class PageReport:
    """What the browser saw while loading one page."""

    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # URLs other than the page itself and data:
    svg_sizes: list[tuple[float, float]] = field(default_factory=list)

    def problems(self) -> list[str]:
        found = [f"console: {m}" for m in self.console_errors]
        found += [f"network request: {u}" for u in self.requests]
        if not self.svg_sizes:
            found.append("no chart: the page has no <svg> element")
        found += [
            f"chart {i} drawn at {w}x{h}" for i, (w, h) in enumerate(self.svg_sizes) if w <= 0 or h <= 0
        ]
        return found


class Chromium:
    """One headless Chromium with a fresh profile, spoken to over the DevTools pipe."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="trainmedic-chromium-")
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def wire() -> None:  # in the child, before exec: the pipe ends become fds 3 and 4
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire,
            pass_fds=(3, 4),
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError, TimeoutError, RuntimeError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _frame(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from Chromium in time")
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
                self._buffer += chunk
        frame, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(frame)
        return message

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = TIMEOUT,
    ) -> dict[str, Any]:
        """Send one command and wait for its reply; events that arrive meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._frame(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._frame(deadline))

    def drain(self, seconds: float) -> None:
        """Collect the events of the next `seconds`."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._frame(deadline))
        except TimeoutError:
            return

    def load(self, page: Path) -> PageReport:
        """Open `page` in a new tab and report what happened while it loaded."""
        url = page.resolve().as_uri()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired")
        self.drain(SETTLE)
        sizes = self.send(
            "Runtime.evaluate",
            {
                "expression": "JSON.stringify([...document.querySelectorAll('svg')].map(e => {"
                "const r = e.getBoundingClientRect(); return [r.width, r.height]; }))",
                "returnByValue": True,
            },
            session=session,
        )["result"]["value"]
        report = PageReport(svg_sizes=[(float(w), float(h)) for w, h in json.loads(sizes)])
        for event in self.events:
            _classify(event, url, report)
        self.send("Target.closeTarget", {"targetId": target})
        return report


def _classify(event: dict[str, Any], url: str, report: PageReport) -> None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
        report.console_errors.append(text)
    elif method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        report.console_errors.append(
            details.get("exception", {}).get("description") or details.get("text", "")
        )
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        report.console_errors.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())
    elif method == "Network.requestWillBeSent":
        requested = params.get("request", {}).get("url", "")
        if requested != url and not requested.startswith("data:"):
            report.requests.append(requested)


@pytest.fixture(scope="module")
def browser() -> Any:
    assert CHROMIUM is not None
    with Chromium(CHROMIUM) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def check_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`trainmedic check --html` on the bundled example runs: curves, events, per-layer charts."""
    from typer.testing import CliRunner

    from trainmedic.cli import app
    from trainmedic.toy.examples import write_examples

    out = tmp_path_factory.mktemp("browser")
    runs = write_examples(out / "examples")
    page = out / "report.html"
    result = CliRunner().invoke(app, ["check", *map(str, runs), "--html", str(page)])
    assert result.exit_code == 1, result.output  # two of the three examples are broken on purpose
    return page


def test_check_report_loads_clean_draws_its_charts_and_fetches_nothing(
    browser: Chromium, check_report: Path
) -> None:
    seen = browser.load(check_report)
    assert seen.problems() == []
    assert len(seen.svg_sizes) >= 6  # three runs, each with curves and per-layer charts


PROBLEM_PAGES = {
    "console.error": (
        "<svg width='10' height='10'></svg><script>console.error('broken chart')</script>",
        "broken chart",
    ),
    "exception": ("<svg width='10' height='10'></svg><script>null.x</script>", "TypeError"),
    "remote image": ("<svg width='10' height='10'></svg><img src='http://192.0.2.1/logo.png'>", "192.0.2.1"),
    "empty chart": ("<svg width='0' height='0'></svg>", "drawn at 0.0x0.0"),
    "no chart": ("<p>nothing drawn</p>", "no chart"),
}


@pytest.mark.parametrize("name", sorted(PROBLEM_PAGES))
def test_the_checker_reports_a_broken_page(browser: Chromium, tmp_path: Path, name: str) -> None:
    body, expected = PROBLEM_PAGES[name]
    page = tmp_path / "page.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{body}</body></html>")
    problems = browser.load(page).problems()
    assert any(expected in p for p in problems), problems
