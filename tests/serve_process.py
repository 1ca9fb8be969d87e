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


# Runs the CLI (``python -m imganom.cli``) in this process, plus a thread that kills it once its parent (the
# test process) is gone, so a crashed pytest leaves no server behind (PR_SET_PDEATHSIG is not honoured in
# every sandbox).
_WITH_PARENT = """
import os, runpy, signal, sys, threading, time
parent = os.getppid()
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["imganom", *sys.argv[1:]]
runpy.run_module("imganom.cli", run_name="__main__")
"""


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
        cmd = [sys.executable, "-c", _WITH_PARENT, "serve", "--model", str(model), "--port", str(self.port)]
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
