"""A real ``python -m service serve`` per module, over a private copy of the tiny index."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.browser import free_port

REPO = Path(__file__).resolve().parents[2]
DIMS = {"audio": 128, "visual": 1024}  # the tiny synthetic set's feature widths


class Server:
    """``serve`` in a subprocess; ``restart()`` stops it and starts it again on the same port."""

    def __init__(self, model: Path, index: Path, **settings: str):
        self.model, self.index, self.port = model, index, free_port()
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **{f"AVSEARCH_{k.upper()}": v for k, v in settings.items()}}
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "service", "serve", "--model", str(self.model), "--index", str(self.index), "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while True:  # serve loads before it binds: the port answering means ready
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not answer within 60 s"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_server(tiny, root: Path, **settings: str) -> Server:
    index = root / "index"
    shutil.copytree(tiny.index_dir, index)
    return Server(tiny.model_dir, index, **settings)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """Open (loopback, no keys), small limits so that uploads and searches are split."""
    s = start_server(tiny, tmp_path_factory.mktemp("client"), max_vectors="64", max_body_bytes="400000", max_top_k="200")
    yield s
    s.stop()
