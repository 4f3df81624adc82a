"""The import directions of the house: avdata (the data layer) imports nothing of ours; training
imports avdata only; index and service import avdata, never training or torch; no import circles."""

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


OURS = ("avdata", "training", "index", "service")


def test_training_imports_nothing_of_ours_but_the_data_layer():
    assert not _imported_top_levels("training") & {"index", "service"}


def test_the_data_layer_imports_nothing_of_ours():
    assert not _imported_top_levels("avdata") & {"training", "index", "service"}


def test_index_and_service_read_data_through_avdata_never_training():
    """The API image ships avdata, index and service only: an import of training would fail there."""
    for package in ("index", "service"):
        imported = _imported_top_levels(package)
        assert "training" not in imported, package
    assert "avdata" in _imported_top_levels("index") and "avdata" in _imported_top_levels("service")


def _module_graph() -> dict[str, set[str]]:
    """Every module of ours -> the modules of ours it imports, function-level imports included."""
    modules = {}
    for package in OURS:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from a.b import c`: a.b.c when c is a module of ours, else a.b
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module for alias in node.names]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}  # state: 1 on the DFS stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_data_layer_has_no_import_circle():
    """training/data.py and training/synthetic.py once imported each other (one of them inside a function)."""
    graph = _module_graph()
    data_layer = {m for m in graph if m.startswith("avdata") or m in ("training.data", "training.synthetic")}
    assert data_layer >= {"avdata.features", "avdata.synthetic", "avdata.paired", "avdata.atomic"}
    circles = [c for c in _cycles(graph) if set(c) & data_layer]
    assert not circles, circles


def test_training_data_and_synthetic_re_export_the_data_layer():
    """The training code imports training.data / training.synthetic unchanged: same objects, whole API."""
    import avdata.features
    import avdata.synthetic
    import training.data
    import training.synthetic

    for shim, real in ((training.data, avdata.features), (training.synthetic, avdata.synthetic)):
        assert shim.__all__ == real.__all__ and real.__all__
        for name in real.__all__:
            assert getattr(shim, name) is getattr(real, name), name


def test_index_and_service_never_import_torch_at_runtime():
    code = (
        "import sys, importlib, pkgutil\n"
        "import index, service\n"
        "for pkg in (index, service):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "from index.build import build_indexes\n"
        "from service.app import create_app\n"
        "import avdata.features, avdata.synthetic, training.data, training.synthetic, training.metrics, training.cca\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_index_and_service_sources_do_not_mention_torch():
    assert "torch" not in _imported_top_levels("index") | _imported_top_levels("service")


def test_the_client_imports_nothing_of_ours():
    """client/ installs alone (httpx + numpy): it speaks HTTP to the service, never imports it."""
    imported = _imported_top_levels("client")
    assert not imported & set(OURS), imported & set(OURS)
    assert imported - {"avsearch_client"} <= {"__future__", "httpx", "numpy", "orjson"} | set(sys.stdlib_module_names), imported
