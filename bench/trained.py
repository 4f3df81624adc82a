"""The benchmarks' model: the default preset trained on the synthetic default, exported (cached)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kw) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, **kw)


def trained_default_model(work: Path) -> Path:
    """``work/model`` (ONNX encoders + manifest.json), trained and exported on first use."""
    py = sys.executable
    if not (work / "run" / "checkpoint.pt").is_file():
        run([py, "-m", "training", "train", "--config", "default", "--data", "synthetic", "--out", str(work / "run"), "--quiet"])
    if not (work / "model" / "manifest.json").is_file():
        run([py, "-m", "training", "export", "--run", str(work / "run"), "--out", str(work / "model")])
    return work / "model"
