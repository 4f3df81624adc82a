"""The import directions of the house: avdata (the data layer) imports nothing of ours; training
imports avdata only; index imports avdata; store imports index and avdata, and no web framework;
service imports store, index and avdata; none of them training or torch; no import circle anywhere,
and no import of our own modules hidden inside a function (the way circles were once dodged)."""

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


OURS = ("avdata", "training", "index", "store", "service")


def test_training_imports_nothing_of_ours_but_the_data_layer():
    assert not _imported_top_levels("training") & {"index", "service"}


def test_the_data_layer_imports_nothing_of_ours():
    assert not _imported_top_levels("avdata") & {"training", "index", "store", "service"}


def test_index_and_service_read_data_through_avdata_never_training():
    """The API image ships avdata, index, store and service only: an import of training would fail there."""
    for package in ("index", "store", "service"):
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
        "import index, store, service\n"
        "for pkg in (index, store, service):\n"
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
    assert "torch" not in _imported_top_levels("index") | _imported_top_levels("store") | _imported_top_levels("service")


# --- the store apart from the HTTP layer (issue 22) ---------------------------------------------
WEB = {"fastapi", "starlette", "pydantic", "pydantic_settings", "prometheus_client", "uvicorn"}
# What each package may import of ours: arrows point down only (service -> store -> index -> avdata).
MAY_IMPORT = {
    "avdata": set(),
    "training": {"avdata"},
    "index": {"avdata"},
    "store": {"index", "avdata"},
    "service": {"store", "index", "avdata"},
}


def test_the_whole_module_graph_has_no_import_circle():
    """Not only the data layer: service/backup, carry and snapshots once imported each other in a
    circle dodged with imports inside functions."""
    graph = _module_graph()
    assert {"store.collection", "store.shard", "store.wal", "service.app", "index.store", "avdata.features"} <= set(graph)
    circles = _cycles(graph)
    assert not circles, circles


def test_each_package_imports_only_the_layers_below_it():
    for package, allowed in MAY_IMPORT.items():
        ours = _imported_top_levels(package) & set(OURS) - {package}
        assert ours <= allowed, f"{package} imports {sorted(ours - allowed)}"


def test_the_store_imports_no_web_framework_and_nothing_of_the_service():
    """The store raises plain errors (store/errors.py); only service/errors.py turns them into statuses."""
    imported = _imported_top_levels("store")
    assert not imported & (WEB | {"service"}), imported & (WEB | {"service"})
    code = (
        "import sys, importlib, pkgutil, store\n"
        "for m in pkgutil.iter_modules(store.__path__):\n"
        "    importlib.import_module('store.' + m.name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(WEB | {'service'})!r})\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _function_level_imports_of_ours() -> list[str]:
    found = []
    for package in OURS:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for function in ast.walk(tree):
                if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(function):
                    if isinstance(node, ast.Import):
                        names = [alias.name for alias in node.names]
                    elif isinstance(node, ast.ImportFrom):
                        names = ["." if node.level else node.module or ""]
                    else:
                        continue
                    found += [f"{path.relative_to(REPO)}:{node.lineno} {name}" for name in names if name == "." or name.split(".")[0] in OURS]
    return found


def test_no_module_of_ours_is_imported_inside_a_function():
    """Imports inside functions only for heavy or optional third-party modules (uvicorn, faiss,
    threadpoolctl, torch, optuna), never for ours: that is how circles hide."""
    found = _function_level_imports_of_ours()
    assert not found, found


def test_the_client_imports_nothing_of_ours():
    """client/ installs alone (httpx + numpy): it speaks HTTP to the service, never imports it."""
    imported = _imported_top_levels("client")
    assert not imported & set(OURS), imported & set(OURS)
    assert imported - {"avsearch_client"} <= {"__future__", "httpx", "numpy", "orjson"} | set(sys.stdlib_module_names), imported
