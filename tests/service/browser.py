"""Helpers for the console's browser tests and bench/ui_bench.py: an index with metadata, a real
``python -m service serve`` process on a free port, and headless Debian Chromium through Selenium.

Selenium is pointed at the system chromedriver and Chromium (``/usr/bin``) and Selenium Manager is
told to stay offline, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Real YouTube ids of the AVE convention (id + start second): links the console must build.
YOUTUBE_IDS = ["dQw4w9WgXcQ", "9bZkp7q19f0", "kJQP7kiw5Fk"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def annotated_index(index_dir: Path, data_dir: Path, dest: Path) -> Path:
    """A copy of ``index_dir`` whose items carry metadata: the class label, the split, and on every
    third clip a YouTube id + start second (AVE style), on every fifth a page URL."""
    from index.store import VectorIndex
    from avdata.features import load_features

    data = load_features(data_dir)
    labels = {clip: int(np.argmax(label)) if np.ndim(label) else int(label) for clip, label in zip(data.ids, data.labels)}
    for modality in ("audio", "visual"):
        index = VectorIndex.load(index_dir / modality)
        ids = index.ids()
        metadata = []
        for n, item_id in enumerate(ids):
            meta: dict = {"label": labels[item_id], "kind": "clip"}
            if n % 3 == 0:
                meta.update(youtube_id=YOUTUBE_IDS[n % len(YOUTUBE_IDS)], start=10 * (n % 7))
            if n % 5 == 0:
                meta["page"] = f"https://example.org/clips/{item_id}"
            metadata.append(meta)
        vectors = np.stack([index.get(i).vector for i in ids])
        index.upsert(vectors, ids, metadata)  # same embeddings, now with metadata
        index.save(dest / modality)
    return dest


@contextmanager
def serving(model_dir: Path, index_dir: Path, env: dict[str, str] | None = None, timeout: float = 90.0):
    """``python -m service serve`` on 127.0.0.1:<free port>; yields its base URL once /readyz is 200."""
    port = free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "service", "serve", "--model", str(model_dir), "--index", str(index_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {timeout} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chromium_driver(width: int = 1400, height: int = 1500):
    """Headless Debian Chromium via the system chromedriver; raises (never skips) when either is missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: apt-get install -y chromium chromium-driver (make install-test does)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def fetch_json(url: str, key: str | None = None) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
