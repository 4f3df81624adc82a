"""`make run` end to end on the tiny preset: make-data → train → export → index → serve → curl."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run_and_search(tmp_path: Path, data_dir: Path) -> dict:
    """`make run` on ``data_dir`` (made by make-data when missing); POST the printed curl's body; the answer."""
    port = _free_port()
    venv = Path(sys.executable).parents[1]
    # The stamp says "installed"; this interpreter's venv is the one make would build.
    (venv / ".run-installed").touch()
    cmd = ["make", "--no-print-directory", "run", f"VENV={venv}", "CONFIG=tiny", f"DATA={data_dir}", f"ARTIFACTS={tmp_path}/art", f"PORT={port}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.time() + 300  # train + export + index on a shared 2-core machine
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("curl "):
                break
        curl = next((l.strip() for l in lines if l.strip().startswith("curl ")), None)
        assert curl, "".join(lines)
        assert f"127.0.0.1:{port}/v1/search" in curl
        body = Path(curl.split("-d @")[1].strip()).read_bytes()
        for _ in range(100):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/search", data=body, headers={"Content-Type": "application/json"})
                return json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                time.sleep(0.2)
        pytest.fail("server never answered:\n" + "".join(lines))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


@pytest.mark.slow
def test_make_run_serves_and_the_printed_curl_works(tmp_path):
    response = make_run_and_search(tmp_path, tmp_path / "data")
    hits = response["results"][0]
    assert len(hits) == 10
    ids = set((tmp_path / "data" / "ids.txt").read_text().split())
    assert all(h["id"] in ids for h in hits)
