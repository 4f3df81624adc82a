"""What a reload swaps in stays served: a reload to another index directory outlives SIGHUP, console
reloads and restarts (item 3); a reload racing the start-up load leaves one collection (item 10); a
SIGHUP while `serve` loads does not kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from store.collection import Collection
from store.layout import MOVED_NAME
from tests.service.conftest import copy_index, make_client, wait_ready
from tests.service.test_service_cli import REPO, one_error_line


def _client(tiny, index: Path, root: Path):
    return make_client(tiny, index, reload_roots=f"{tiny.model_dir.parent}:{root}")


def _write(c, item_id: str, features) -> None:
    assert c.post("/v1/items/audio", json={"items": [{"id": item_id, "vector": features.audio[0].tolist(), "metadata": {"on": item_id}}]}).status_code == 200


def test_a_reload_to_another_directory_moves_the_configured_link(tiny, tmp_path, features):
    """The prepare layout: the configured index path is a symlink. A reload to B points it at B, so
    a bodiless reload (SIGHUP, the console), a restart and prepare all find B's writes."""
    root = tmp_path / "indexes"
    a, b = copy_index(tiny, root / "a"), copy_index(tiny, root / "b")
    link = root / "current"
    link.symlink_to("a")
    with _client(tiny, link, root) as c:
        wait_ready(c)
        assert c.post("/v1/admin/reload", json={"index_dir": str(b)}).status_code == 200
        _write(c, "on-b", features)
        assert link.resolve() == b.resolve()
        assert c.post("/v1/admin/reload", json={}).status_code == 200  # what SIGHUP and the console's reload do
        assert c.get("/v1/items/audio/on-b").json()["metadata"] == {"on": "on-b"}
    with _client(tiny, link, root) as c:  # a restart
        wait_ready(c)
        assert c.get("/v1/items/audio/on-b").status_code == 200


def test_a_reload_away_from_a_real_directory_is_not_forgotten(tiny, tmp_path, features):
    """The configured index path is a directory, which cannot be re-pointed: bodiless reloads keep
    serving B; a restart or a prepare on the configured one is refused, naming B, until a reload
    comes back to it."""
    root = tmp_path / "indexes"
    a, b = copy_index(tiny, root / "a"), copy_index(tiny, root / "b")
    with _client(tiny, a, root) as c:
        wait_ready(c)
        assert c.post("/v1/admin/reload", json={"index_dir": str(b)}).status_code == 200
        _write(c, "on-b", features)
        assert c.post("/v1/admin/reload", json={}).status_code == 200
        assert c.get("/v1/items/audio/on-b").status_code == 200
    prepare = [sys.executable, "-m", "service", "prepare", "--model", str(tiny.model_dir), "--index", str(a), "--data", str(tiny.data_dir), "--rebuild"]
    line = one_error_line(subprocess.run(prepare, cwd=REPO, capture_output=True, text=True, timeout=120))
    assert str(b.resolve()) in line and MOVED_NAME in line
    with _client(tiny, a, root) as c:  # a restart would serve A without B's writes: refused instead
        ready = c.get("/readyz")
        while "still loading" in ready.text:
            time.sleep(0.05)
            ready = c.get("/readyz")
        assert ready.status_code == 503 and str(b.resolve()) in ready.json()["detail"] and MOVED_NAME in ready.json()["detail"]
        back = c.post("/v1/admin/reload", json={"index_dir": str(a)})  # the operator chooses A again, knowingly
        assert back.status_code == 200 and not (a / MOVED_NAME).exists()
        assert c.get("/v1/items/audio/on-b").status_code == 404


def test_a_reload_racing_the_start_up_load_leaves_one_engine(tiny, tmp_path, monkeypatch):
    """The background load and a reload both made a collection; the one swapped in first leaked, its
    snapshotter still folding (stale data over the live snapshot, the live log segment deleted)."""
    made: list[Collection] = []
    real_load = Collection.load.__func__

    def slow_first_load(cls, *args, **kwargs):
        if not made:
            made.append(None)  # the placeholder makes the next load fast
            time.sleep(1.5)
            made[0] = real_load(cls, *args, **kwargs)
            return made[0]
        made.append(real_load(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Collection, "load", classmethod(slow_first_load))
    with make_client(tiny, copy_index(tiny, tmp_path / "index")) as c:
        time.sleep(0.2)  # the start-up load is under way
        assert c.post("/v1/admin/reload", json={}).status_code == 200
        wait_ready(c)
        time.sleep(1.5)
        live = c.app.state.avsearch.collection
        assert len(made) == 2 and live in made
        assert all(e._closed for e in made if e is not live) and not live._closed


def test_a_sighup_while_serve_loads_does_not_kill_it(tiny, tmp_path):
    from tests.service.browser import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "service", "serve", "--model", str(tiny.model_dir), "--index", str(copy_index(tiny, tmp_path / "index")), "--port", str(port)]
    default_sighup = lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)  # noqa: E731 (a shell started with nohup passes SIGHUP ignored)
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sighup)
    try:
        for line in proc.stderr:  # the first log line comes from the load (the embedder's providers)
            if "index.embedder" in line:
                break
        proc.send_signal(signal.SIGHUP)
        serving = any("avsearch serving" in line for line in proc.stdout)  # printed once loaded; EOF if it died
        assert serving and proc.poll() is None, f"serve died with {proc.wait()}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
