"""Helpers of the browser tests (test_browser.py, test_dashboard_browser.py): a free port, JSON over HTTP, a
headless Chromium, and waiting for a TensorBoard subprocess to answer."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def chromium(
    url: str, profile: Path, *extra: str, size: str = "1400,1000", budget_ms: int = 20000, timeout: float = 120
) -> str:
    """Load ``url`` in headless Chromium (``extra``: e.g. ``--dump-dom``, ``--screenshot=PATH``); its stdout."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={size}",
        "--hide-scrollbars",
        f"--virtual-time-budget={budget_ms}",
        *extra,
        url,
    ]
    return subprocess.run(cmd, check=True, timeout=timeout, capture_output=True, text=True).stdout


def wait_for(proc: subprocess.Popen, answer: Callable[[], Any], timeout: float, what: str, poll: float = 0.25) -> Any:
    """Call ``answer`` until it returns something truthy (an ``OSError`` means not yet), while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with {proc.returncode}")
        try:
            got = answer()
            if got:
                return got
        except OSError:
            pass
        time.sleep(poll)
    raise TimeoutError(f"tensorboard did not {what} within {timeout} s")


@contextmanager
def running_tensorboard(logdir: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """TensorBoard on a free local port over ``logdir``: ``(process, base URL)``, stopped on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    proc = subprocess.Popen([*cmd, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
