"""The client installs alone into a fresh virtualenv (pip fetches httpx and numpy) and imports without the server's stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER_STACK = ("torch", "faiss", "onnxruntime", "fastapi", "uvicorn", "pydantic", "avsearch", "service", "index", "training")

CHECK = f"""
import importlib.util, sys
import avsearch_client
from avsearch_client import Client, AsyncClient
present = [m for m in {SERVER_STACK!r} if importlib.util.find_spec(m) is not None]
assert not present, f"the client's venv holds {{present}}"
assert not set(sys.modules) & set({SERVER_STACK!r})
assert avsearch_client.__file__.startswith(sys.prefix), avsearch_client.__file__  # the installed copy, not the checkout
print("ok", avsearch_client.__version__)
"""


@pytest.mark.slow
def test_installs_alone_into_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # no system site packages
    python = venv / "bin" / "python"
    source = shutil.copytree(REPO / "client", tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))  # pip builds in the tree
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    checked = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert checked.returncode == 0 and checked.stdout.startswith("ok"), checked.stderr[-3000:]
    typed = list((venv / "lib").glob("python*/site-packages/avsearch_client/py.typed"))
    assert typed, "py.typed is not installed"
    cli = subprocess.run([str(venv / "bin" / "avsearch"), "--help"], capture_output=True, text=True)
    assert cli.returncode == 0 and "search" in cli.stdout
