"""A real ``imganom serve`` subprocess on a free loopback port, for the serve integration tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("IMGANOM_TOKEN", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``imganom serve`` subprocess (the CLI entry point) on a free loopback port."""

    def __init__(self, model: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "imganom.cli", "serve", "--model", str(model), "--port", str(self.port)]
        cmd += args
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV)

    def wait_ready(self, timeout: float = 90.0) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready after {timeout}s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """Teardown only: the graceful SIGTERM path has its own test."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
