"""AVSEARCH_WORKERS=2: one collection served by two processes, the primary and a worker forked
from it (service.workers, store.sharedlog).

Real ``python -m service serve`` processes. A connection reaches one process (the kernel spreads
them); ``/healthz`` names it in ``X-Avsearch-Worker``, so the tests hold one connection per process.
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

from index.build import build_indexes
from service.workers import METRICS_PREFIX, STOP_GRACE_S, metrics_directory
from tests.service.conftest import copy_index
from tests.store.test_crash import DIMS, GONE, Server, Writer, _check

WORKERS = {"AVSEARCH_WORKERS": "2"}


def _worker_connections(server: Server, count: int = 2, deadline_s: float = 30.0) -> dict[int, http.client.HTTPConnection]:
    """One keep-alive connection to each of ``count`` serving processes (the primary among them)."""
    found: dict[int, http.client.HTTPConnection] = {}
    deadline = time.monotonic() + deadline_s
    while len(found) < count:
        assert time.monotonic() < deadline, f"reached only workers {sorted(found)}"
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
        except OSError:
            time.sleep(0.05)
            continue
        pid = int(response.getheader("X-Avsearch-Worker"))
        if pid in found:
            conn.close()
        else:
            found[pid] = conn
    return found


def _metric(server: Server, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples carrying ``labels`` in /metrics."""
    status, text = _get_text(server, "/metrics")
    assert status == 200, f"/metrics answered {status}: {text[:500]}\nthe server's log:\n{server.log()[-3000:]}"
    total = 0.0
    for line in text.splitlines():
        sample = line.split("{")[0].split(" ")[0]
        if sample == name and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _get_text(server: Server, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_forked_children_search_and_embed_after_the_parent_did(tiny):
    """The fork pitfalls the workers avoid: a child of a process that ran an OpenMP team hangs in its
    first FAISS search (libgomp), and ONNX Runtime's thread pools do not cross a fork. With the
    primary's rules (one OpenMP thread; encoder sessions of one thread, which have no pool, shared;
    others opened after the fork) a forked child searches with two threads and embeds, with the
    parent's results."""
    script = textwrap.dedent(
        f"""
        import os, sys, numpy as np, faiss
        from index.embedder import Embedder
        faiss.omp_set_num_threads(1)
        x = np.random.default_rng(0).standard_normal((5000, 32)).astype("float32")
        index = faiss.IndexHNSWFlat(32, 16)
        index.add(x)
        expected = index.search(x[:200], 5)[1]
        embedder = Embedder({str(tiny.model_dir)!r}, device="cpu", intra_op_threads=1)
        queries = np.random.default_rng(1).standard_normal((64, 128)).astype("float32")
        embedded = embedder.embed("audio", queries)
        pid = os.fork()
        if pid == 0:
            faiss.omp_set_num_threads(2)
            ok = (index.search(x[:200], 5)[1] == expected).all()
            ok &= np.allclose(embedder.embed("audio", queries), embedded, atol=1e-6)  # one intra-op thread: no pool to break, shared
            ok &= np.allclose(Embedder({str(tiny.model_dir)!r}, device="cpu", intra_op_threads=2).embed("audio", queries), embedded, atol=1e-6)
            os._exit(0 if ok else 3)
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_workers_forked_after_the_primary_ran_hnsw_inserts_search(tiny, tmp_path):
    """The OpenMP pitfall in the server itself, with OpenMP free to use 4 threads: the primary
    applies a batch of upserts to an HNSW index (FAISS parallel regions) in a commit thread, and,
    after a restart, replays them from the log in the thread that forks the workers; every worker
    forked afterwards (the first ones, and the replacement of one killed) must still search."""
    build_indexes(tiny.model_dir, tiny.data_dir, tmp_path / "index", factory="HNSW32", device="cpu", progress=False)
    settings = {"OMP_NUM_THREADS": "4", "AVSEARCH_WAL_SNAPSHOT_BYTES": str(2**30), "AVSEARCH_WAL_SNAPSHOT_SECONDS": "3600", **WORKERS}  # no fold: a replay
    server = Server(tiny.model_dir, tmp_path / "index", **settings)
    vectors = np.random.default_rng(9).standard_normal((400, DIMS["audio"])).round(5)
    items = [{"id": f"bulk-{i}", "vector": v.tolist()} for i, v in enumerate(vectors)]
    assert server.request("POST", "/v1/items/audio", {"items": items})[0] == 200
    server.kill()
    server = Server(tiny.model_dir, tmp_path / "index", **settings)
    try:
        victim = next(pid for pid in _worker_connections(server) if pid != server.proc.pid)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while victim in _worker_connections(server):
            assert time.monotonic() < deadline, "the dead worker was not replaced"
        for conn in _worker_connections(server).values():
            status, body = server.request("POST", "/v1/search", {"modality": "audio", "target": "audio", "vectors": [vectors[7].tolist()], "top_k": 3}, conn=conn)
            assert status == 200 and body["results"][0][0]["id"] == "bulk-7", body
    finally:
        server.kill()


def test_a_write_through_one_worker_is_found_at_once_through_the_other(tiny, tmp_path):
    server = Server(tiny.model_dir, copy_index(tiny, tmp_path / "index"), **WORKERS)
    try:
        (pid_a, a), (pid_b, b) = _worker_connections(server).items()
        assert pid_a != pid_b and {pid_a, pid_b} <= set(server.processes())
        # the harness's one /readyz that answered 200; the primary's warm-up before the forks is not counted
        assert _metric(server, "avsearch_requests_total", route="/readyz", method="GET", status="200") == 1
        rng = np.random.default_rng(5)
        searches = {"a": 0, "b": 0}
        for n in range(25):
            writer, reader = (a, b) if n % 2 == 0 else (b, a)
            vector = rng.standard_normal(DIMS["visual"]).round(5).tolist()
            item = f"both-{n}"
            status, body = server.request("POST", "/v1/items/visual", {"items": [{"id": item, "vector": vector, "metadata": {"n": n}}]}, conn=writer)
            assert status == 200, body
            status, body = server.request("POST", "/v1/search", {"modality": "visual", "target": "visual", "vectors": [vector], "top_k": 1}, conn=reader)
            assert status == 200 and body["results"][0][0]["id"] == item and body["results"][0][0]["metadata"] == {"n": n}, body
            searches["b" if reader is b else "a"] += 1
            if n % 5 == 4:  # a delete through one worker is gone at once through the other
                assert server.request("DELETE", f"/v1/items/visual/{item}", conn=reader)[0] == 200
                assert server.request("GET", f"/v1/items/visual/{item}", conn=writer)[0] == 404
        # a body over PARSE_ON_LOOP_BYTES is parsed by the primary's parser processes, for either worker
        many = rng.standard_normal((300, DIMS["audio"])).round(6).tolist()
        for conn in (a, b):
            status, body = server.request("POST", "/v1/search", {"modality": "audio", "vectors": many, "top_k": 2}, conn=conn)
            assert status == 200 and len(body["results"]) == 300, body
        # /metrics adds up over the workers (either one answers it): their group commits, their requests
        assert _metric(server, "avsearch_requests_total", route="/v1/search", method="POST", status="200") == 27
        assert _metric(server, "avsearch_commit_group_changes_count", modality="visual") == 30
        assert _metric(server, "avsearch_index_items", modality="visual") == server.request("GET", "/v1/info")[1]["index_sizes"]["visual"]
    finally:
        server.kill()


def test_a_dead_worker_is_replaced_and_a_swap_reaches_every_worker(tiny, tmp_path):
    server = Server(tiny.model_dir, copy_index(tiny, tmp_path / "index"), **WORKERS)
    try:
        first = _worker_connections(server)
        victim = next(pid for pid in first if pid != server.proc.pid)  # the primary's death stops the server
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while victim in _worker_connections(server):  # the replacement answers
            assert time.monotonic() < deadline, "the dead worker was not replaced"
        assert server.request("POST", "/v1/items/audio", {"items": [{"id": "after-death", "vector": [0.25] * DIMS["audio"]}]})[0] == 200
        for conn in _worker_connections(server).values():
            assert server.request("GET", "/v1/items/audio/after-death", conn=conn)[0] == 200

        status, body = server.request("POST", "/v1/admin/reload", {})
        assert status == 200, body
        deadline = time.monotonic() + 30
        while True:  # the old generation stops; a new one serves
            workers = _worker_connections(server)
            if server.proc.pid in workers and not set(workers) & set(first) - {server.proc.pid} and len([p for p in server.processes() if p != server.proc.pid]) == 1:
                break
            assert time.monotonic() < deadline, f"old workers still serve: {sorted(workers)} vs {sorted(first)}"
            time.sleep(0.2)
        for conn in workers.values():  # the change made before the swap is in the new version, on every worker
            assert server.request("GET", "/v1/items/audio/after-death", conn=conn)[0] == 200
        assert _metric(server, "avsearch_version_swaps_total") == 1
        status, card = server.request("POST", "/v1/admin/snapshots", {})  # taken by the primary, once
        assert status == 201 and card["items"]["audio"] == server.request("GET", "/v1/info")[1]["index_sizes"]["audio"], card
    finally:
        server.kill()


def test_a_swap_is_answered_once_the_old_workers_take_no_more_requests(tiny, tmp_path):
    """Found by bench/fuzz.py with 2 workers: after a swap a client's next request on a kept-alive
    connection to an old worker failed ("Remote end closed connection"), or reached the old version.
    Now, by the time the swap is answered, every idle connection to an old worker is closed (a
    client sees that before it sends again), the swap's own connection to one is told ``Connection:
    close``, and a new connection reaches the new generation at once. The primary serves the new
    version on the connections it kept."""
    server = Server(tiny.model_dir, copy_index(tiny, tmp_path / "index"), **WORKERS)
    try:
        old = _worker_connections(server)
        primary = old.pop(server.proc.pid)
        swapped = False
        while not swapped:  # the swap asked through an old worker (a connection may reach the primary)
            reload = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            reload.request("GET", "/healthz")
            answer = reload.getresponse()
            answer.read()
            if int(answer.getheader("X-Avsearch-Worker")) == server.proc.pid:
                reload.close()
                continue
            reload.request("POST", "/v1/admin/reload", body="{}", headers={"Content-Type": "application/json"})
            response = reload.getresponse()
            assert response.status == 200, response.read()
            assert response.getheader("connection") == "close"
            swapped = True
        for pid, conn in old.items():
            conn.sock.setblocking(False)
            assert conn.sock.recv(1, socket.MSG_PEEK) == b"", f"worker {pid}'s idle connection is still open"  # at EOF, not "no data yet"
        new = _worker_connections(server)
        assert not set(new) & set(old), f"an old worker took a connection after the swap: {sorted(new)} vs {sorted(old)}"
        for conn in new.values():
            assert server.request("POST", "/v1/search", {"modality": "audio", "vectors": [[0.1] * DIMS["audio"]], "top_k": 3}, conn=conn)[0] == 200
        # the primary's kept connection reaches the new version: the old one, sealed, would refuse the change (503)
        status, body = server.request("POST", "/v1/items/audio", {"items": [{"id": "after-swap", "vector": [0.5] * DIMS["audio"]}]}, conn=primary)
        assert status == 200, body
        for conn in new.values():
            assert server.request("GET", "/v1/items/audio/after-swap", conn=conn)[0] == 200
    finally:
        server.kill()


def test_acknowledged_changes_survive_killing_a_worker_or_the_whole_group(tiny, tmp_path):
    """The crash test's promises with two workers: SIGKILL one worker (the others go on; it is
    replaced) or every process at once, while writers write through both and folds run after nearly
    every commit; every acknowledged change is there after, an unanswered one wholly or not at all."""
    index_dir = copy_index(tiny, tmp_path / "index")
    rng = random.Random(23)
    state: dict[str, dict[str, object]] = {"audio": {}, "visual": {}}
    server = Server(tiny.model_dir, index_dir, **WORKERS)
    base_sizes = server.request("GET", "/v1/info")[1]["index_sizes"]
    acked, kills = 0, {"worker": 0, "group": 0}
    try:
        for round_ in range(10):
            how = "worker" if round_ % 2 == 0 else "group"
            writers = [Writer(server, w, round_, state, random.Random(rng.random())) for w in range(4)]
            for w in writers:
                w.start()
            time.sleep(rng.uniform(0.2, 0.6))
            if how == "worker":
                os.kill(rng.choice([p for p in server.processes() if p != server.proc.pid]), signal.SIGKILL)
                # The others live on: let the writers through them finish before looking.
                time.sleep(1.0)
                for w in writers:
                    w.stop.set()
            else:
                for pid in server.processes():
                    os.kill(pid, signal.SIGKILL)
                server.kill()
            for w in writers:
                w.join(30)
                assert not w.is_alive()
                for item_id, value in w.acked:
                    state[w.modality][item_id] = value
                acked += len(w.acked)
            kills[how] += 1
            if how == "group":
                server = Server(tiny.model_dir, index_dir, **WORKERS)
            _worker_connections(server)  # both workers serve again
            for w in writers:  # an unanswered change: all of it or none of it
                if w.unanswered:
                    found = [server.request("GET", f"/v1/items/{w.modality}/{i}") for i, _ in w.unanswered]
                    landed = [(s == 200 and b["metadata"] == v) or (s == 404 and v == GONE) for (i, v), (s, b) in zip(w.unanswered, found)]
                    assert all(landed) or not any(landed), (w.unanswered, [(s, b.get("detail")) for s, b in found])
                    if all(landed):
                        state[w.modality].update(w.unanswered)
            for conn in _worker_connections(server).values():  # each worker holds every change
                _check_through(server, conn, state)
            _check(server, state, base_sizes)
    finally:  # a failed round leaves no server behind
        server.kill()
    assert acked > 100 and kills == {"worker": 5, "group": 5}


def test_a_primary_whose_index_no_longer_matches_the_log_stops_the_server(tiny, tmp_path):
    """Found with bench/write_workers_ab.py (two servers on one directory): a primary that could not
    apply what the workers logged went on answering /readyz while it took no checkpoint and its log
    grew without end, and the workers it forked next started from its stale image. Now it stops every
    worker and exits with 1, saying why and that a restart replays the log."""
    index_dir = copy_index(tiny, tmp_path / "index")
    server = Server(tiny.model_dir, index_dir, **WORKERS, AVSEARCH_FOLLOW_SECONDS="2", AVSEARCH_WAL_SNAPSHOT_BYTES="100000000", AVSEARCH_WAL_SNAPSHOT_SECONDS="3600")
    try:
        # through the forked worker: a change the primary took itself is in its index already, and a
        # worker that cannot read it back is replaced by a fork of that image (CI saw it half the time)
        worker = next(conn for pid, conn in _worker_connections(server).items() if pid != server.proc.pid)
        assert server.request("POST", "/v1/items/audio", {"items": [{"id": "unreadable", "vector": [0.25] * DIMS["audio"]}]}, conn=worker)[0] == 200
        segment = max((index_dir / "wal" / "audio").glob("*.wal"))
        with open(segment, "r+b") as log_file:  # the record just logged no longer reads back for the processes that follow
            log_file.seek(-1, os.SEEK_END)
            last = log_file.read(1)[0]
            log_file.seek(-1, os.SEEK_END)
            log_file.write(bytes([last ^ 0xFF]))
        try:
            code = server.proc.wait(STOP_GRACE_S + 20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the primary kept serving an index that no longer matches its log") from None
        stderr = server.log()
        assert code == 1, stderr[-3000:]
        assert "no longer matches" in stderr and "restart" in stderr, stderr[-3000:]
        deadline = time.monotonic() + 10
        while server.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.processes(), f"workers of the stopped server still run: {server.processes()}"
    finally:
        if server.proc.poll() is None:
            server.kill()


def _check_through(server: Server, conn: http.client.HTTPConnection, state: dict) -> None:
    for modality, expected in state.items():
        for item_id, value in list(expected.items())[-20:]:
            status, body = server.request("GET", f"/v1/items/{modality}/{item_id}", conn=conn)
            assert (status == 200 and body["metadata"] == value) if value != GONE else status == 404, (item_id, status, body)


def test_sigterm_during_a_version_swap_stops_the_server(tiny, tmp_path):
    """Found by bench/fuzz.py: a swap waiting for the main thread to fork its workers, and a second
    swap waiting for the first, kept a stopped primary alive forever. Both now give up. CI found the
    second one again with the serving primary (half the runs): its swap waited for the first, whose
    old worker the stopped supervisor no longer counted as gone, while the stop waited for the swap."""
    server = Server(tiny.model_dir, copy_index(tiny, tmp_path / "index"), **WORKERS)
    answers: list[int] = []
    reloads = [threading.Thread(target=lambda: _swallow(lambda: answers.append(server.request("POST", "/v1/admin/reload", {})[0])), daemon=True) for _ in range(2)]
    for reload in reloads:
        reload.start()
    time.sleep(0.3)  # the swaps are loading the version
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(STOP_GRACE_S + 20)
    except subprocess.TimeoutExpired:
        server.kill()
        raise AssertionError("the primary did not stop after SIGTERM during a swap") from None
    for reload in reloads:
        reload.join(5)
    assert set(answers) <= {200, 503}, answers  # done, or refused for the stop; never a 500
    deadline = time.monotonic() + 10
    while server.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.processes(), f"processes of the stopped server still run: {server.processes()}"


def _swallow(function, *args) -> None:
    try:
        function(*args)
    except (OSError, http.client.HTTPException, ValueError):  # the server stopped under the request (an empty body is no JSON)
        pass


def test_the_metrics_folders_of_killed_primaries_are_removed_at_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no process now
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "killed": f"{METRICS_PREFIX}{gone.pid}-a1",
            "running": f"{METRICS_PREFIX}{running.pid}-b2",
            "same pid": f"{METRICS_PREFIX}{os.getpid()}-c3",  # an earlier primary with this pid (pid 1 in a container)
            "unnamed": f"{METRICS_PREFIX}x9",
            "other": "not-ours",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "counter_1.db").write_bytes(b"figures")
        created = Path(metrics_directory())
    finally:
        running.kill()
        running.wait()
    assert created.parent == tmp_path and created.name.startswith(f"{METRICS_PREFIX}{os.getpid()}-") and not any(created.iterdir())
    kept = {names["running"], names["unnamed"], names["other"], created.name}
    assert {p.name for p in tmp_path.iterdir()} == kept


def test_a_worker_forked_while_the_primary_serves_holds_none_of_its_connections(tiny, tmp_path):
    """The primary forks a replacement while it serves: its searches go on (each answered 200), and
    the child holds none of its client connections: one the primary closes ends for its client at
    once, not when the child exits."""
    server = Server(tiny.model_dir, copy_index(tiny, tmp_path / "index"), **WORKERS)
    try:
        connections = _worker_connections(server)
        primary = connections.pop(server.proc.pid)
        (victim,) = connections
        idle = _raw_connection_to(server, server.proc.pid)  # open, and idle, when the replacement is forked
        stop, statuses = threading.Event(), []

        def search_load() -> None:
            while not stop.is_set():
                statuses.append(server.request("POST", "/v1/search", {"modality": "audio", "vectors": [[0.2] * DIMS["audio"]], "top_k": 3}, conn=primary)[0])

        load = threading.Thread(target=search_load, daemon=True)
        load.start()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while victim in (serving := _worker_connections(server)) or len(serving) < 2:  # the replacement answers
            assert time.monotonic() < deadline, "the dead worker was not replaced"
        time.sleep(0.2)
        stop.set()
        load.join(30)
        assert statuses and set(statuses) == {200}, statuses[-20:]
        for conn in serving.values():  # the replacement searches: it inherited no lock held for good
            assert server.request("POST", "/v1/search", {"modality": "visual", "vectors": [[0.3] * DIMS["visual"]], "top_k": 3}, conn=conn)[0] == 200

        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        received = b""
        try:
            while chunk := idle.recv(65536):
                received += chunk
        except socket.timeout:
            raise AssertionError("the connection the primary closed stays open: a forked worker holds it") from None
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
    finally:
        server.kill()


def _raw_connection_to(server: Server, pid: int, deadline_s: float = 30.0) -> socket.socket:
    """A keep-alive connection (a plain socket) that process ``pid`` of the server answered."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head, body = answer.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")))
        while len(body) < length:  # the whole answer read: the connection is idle
            body += sock.recv(65536)
        if f"x-avsearch-worker: {pid}\r\n".encode() in head.lower() + b"\r\n":
            return sock
        sock.close()
    raise AssertionError(f"no connection reached process {pid}")
