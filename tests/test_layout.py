"""The import directions of the house: training imports nothing of ours; index/service never torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imported_top_levels(package: str) -> set[str]:
    names = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_training_imports_nothing_of_ours():
    assert not _imported_top_levels("training") & {"index", "service"}


def test_index_and_service_never_import_torch_at_runtime():
    code = (
        "import sys, importlib, pkgutil\n"
        "import index, service\n"
        "for pkg in (index, service):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "from index.build import build_indexes\n"
        "from service.app import create_app\n"
        "import training.data, training.synthetic, training.metrics, training.cca\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_index_and_service_sources_do_not_mention_torch():
    assert "torch" not in _imported_top_levels("index") | _imported_top_levels("service")
