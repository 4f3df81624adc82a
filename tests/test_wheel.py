"""The wheel serves: built from the sources, installed (not editable) into a fresh virtual
environment, and run from outside the checkout, ``python -m service serve`` answers a search.

A package list in pyproject.toml once missed ``service.routers``: the editable install every other
test uses could not notice, since it imports the checkout itself. Here nothing of the checkout is
importable: the sources are copied and built into a wheel, the venv sees only the wheel and the
already-installed third-party dependencies (a ``.pth`` line naming this interpreter's
site-packages, added after the install so that pip never sees the editable copy), the working
directory is a temporary one, and PYTHONPATH is unset.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from avdata.features import load_features
from tests.service.browser import free_port
from tests.service.conftest import copy_index

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("avdata", "training", "index", "store", "service")


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel of this checkout, not editable."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source])
    (wheel,) = (root / "dist").glob("avsearch-*.whl")
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", env_dir])
    python = env_dir / "bin" / "python"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=root, env=_clean_env())
    target = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root, env=_clean_env()).stdout.strip())
    # The dependencies already installed here, visible without a download; appended after the
    # venv's own site-packages, so the wheel's copy of our packages comes first.
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (target / "zz-avsearch-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return env_dir


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_the_installed_packages_are_the_wheels_not_the_checkout(venv, tmp_path):
    python = venv / "bin" / "python"
    code = "import json, avdata, index, store, service, service.routers, service.app\n" "print(json.dumps({m.__name__: m.__file__ for m in (avdata, index, store, service, service.routers)}))"
    found = json.loads(_run([python, "-c", code], cwd=tmp_path, env=_clean_env()).stdout)
    for name, file in found.items():
        assert Path(file).resolve().is_relative_to(venv.resolve()), (name, file)
        assert not Path(file).resolve().is_relative_to(REPO), (name, file)
    ui = Path(found["service"]).parent / "ui" / "index.html"
    assert ui.is_file()  # package data: the web console


def test_the_installed_service_serves_a_search(venv, tiny, tmp_path):
    index_dir = copy_index(tiny, tmp_path / "index")
    port = free_port()
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cmd = [venv / "bin" / "python", "-m", "service", "serve", "--model", tiny.model_dir, "--index", index_dir, "--port", str(port)]
    env = {**_clean_env(), "AVSEARCH_DEVICE": "cpu", "AVSEARCH_SNAPSHOT_DIR": str(tmp_path / "snapshots")}
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the installed service never became ready"
            time.sleep(0.2)
        query = load_features(tiny.data_dir).audio[:2].astype(float).tolist()
        body = json.dumps({"modality": "audio", "vectors": query, "top_k": 3}).encode()
        request = urllib.request.Request(f"{url}/v1/search", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            answer = json.loads(r.read())
        assert len(answer["results"]) == 2 and all(len(hits) == 3 for hits in answer["results"]), answer
        assert all(isinstance(hit["id"], str) and isinstance(hit["score"], float) for hits in answer["results"] for hit in hits)
        with urllib.request.urlopen(f"{url}/ui/", timeout=10) as r:  # the console's files came with the wheel
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
