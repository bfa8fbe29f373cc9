"""Real server processes on 127.0.0.1: `ktchat api` (start_server), and any other server (running), e.g. the
`llamafactory-cli api` and webchat tests'.

The one copy of these helpers. Imports go one way: bench/ scripts import tests/ (this module, reference.py,
tolerances.py) by putting tests/ on sys.path; no test imports from bench/ (tests/test_layers.py checks it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable


def rss_mib(pid: int) -> float | None:
    """A process's resident memory in MiB (Linux), None where it cannot be read."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _answers_health(url: str) -> bool:
    try:
        get_json(url + "/health", timeout=1)
        return True
    except OSError:
        return False


def wait_until_ready(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, what: str,
                     log_path: Path) -> None:
    """Waits until `ready()` is true; fails with the log's tail if `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"{what} exited {proc.returncode}: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} did not come up in {timeout:.0f}s: {log_path.read_text()[-3000:]}"
        time.sleep(0.2)


def start_server(config, log_path: Path, *extra: str, command=None, env=None, timeout: float = 180.0):
    """`ktchat api` in a subprocess on a free port; returns (process, base url) once /health answers."""
    port = free_port()
    cmd = [*(command or [sys.executable, "-m", "ktchat.cli", "api"]), str(config), "--port", str(port), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    # SIGINT back to its default in the server: a shell's background job starts with it ignored, and then neither
    # Ctrl+C's shutdown ends in KeyboardInterrupt (exit 130) nor does stop() by SIGINT test what a terminal does
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, lambda: _answers_health(url), timeout, "the server", log_path)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def settle(url: str, timeout: float = 10.0) -> dict:
    """/health once the server has let go of everything (nothing waiting or running, no watcher left)."""
    deadline = time.monotonic() + timeout
    while True:
        health = get_json(url + "/health")
        if (health["waiting"], health["busy"], health["watchers"]) == (0, False, 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


@contextlib.contextmanager
def running(command: list[str], *, env: dict, cwd: Path, log_path: Path, ready: Callable[[], bool], timeout: float,
            what: str):
    """Starts `command`, waits until `ready()` is true (failing with the log's tail if the process exits or
    `timeout` passes), yields, and stops it however the test ended."""
    log = open(log_path, "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        wait_until_ready(server, ready, timeout, what, log_path)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
