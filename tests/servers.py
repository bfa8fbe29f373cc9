"""A real server process for the tests that drive `llamafactory-cli api` and `webchat` over 127.0.0.1."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from load_test import free_port  # noqa: E402,F401  (the one free-port helper; the tests take it from here)


@contextlib.contextmanager
def running(command: list[str], *, env: dict, cwd: Path, log_path: Path, ready: Callable[[], bool], timeout: float,
            what: str):
    """Starts `command`, waits until `ready()` is true (failing with the log's tail if the process exits or
    `timeout` passes), yields, and stops it however the test ended."""
    log = open(log_path, "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert server.poll() is None, f"{what} exited {server.returncode}: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{what} did not come up in {timeout:.0f}s: " \
                                                f"{log_path.read_text()[-3000:]}"
            time.sleep(1)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
