"""The crash test: writers upsert and delete while a real `python -m service serve` is SIGKILLed at
random moments (snapshots are folded after almost every commit, so many kills land in one); after
each restart every acknowledged change is there with its metadata, an unanswered change is either
wholly there or wholly absent (a two-item upsert never half), and searches answer. Then the log of
a killed server is damaged on purpose (a flipped byte mid-record, a zero tail, a zeroed record, a bad
frame in an older segment): each restart serves every acknowledged change, or refuses to start
naming the file and the byte offset.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from tests.service.browser import free_port
from tests.service.conftest import copy_index

REPO = Path(__file__).resolve().parents[2]
KILLS = 22
WRITERS = 4
DIMS = {"audio": 128, "visual": 1024}
GONE = "gone"  # the expected state of a deleted id


class Server:
    def __init__(self, model: Path, index: Path, **settings: str):
        self.port = free_port()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "AVSEARCH_WAL_SNAPSHOT_BYTES": "3000",  # fold after nearly every visual commit and every few audio ones
            "AVSEARCH_WAL_SNAPSHOT_SECONDS": "0.2",
            "AVSEARCH_WAL_SNAPSHOT_GROWTH": "0",  # fold by the byte threshold alone, however large the snapshot
            "AVSEARCH_MAX_VECTORS": "2048",
            **settings,
        }
        cmd = [sys.executable, "-m", "service", "serve", "--model", str(model), "--index", str(index), "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._log_lines: collections.deque[str] = collections.deque(maxlen=1000)
        self._reader = threading.Thread(target=self._read_log, daemon=True)  # unread, a full pipe would block the server's logging
        self._reader.start()
        deadline = time.monotonic() + 60
        while True:  # serve loads (snapshot + replay) before it binds: the port answering means ready
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode} on restart:\n{self.log()[-3000:]}")
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come back within 60 s"
            time.sleep(0.03)

    def request(self, method: str, path: str, body: dict | None = None, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            if own:
                conn.close()

    def _read_log(self) -> None:
        with self.proc.stderr:
            self._log_lines.extend(self.proc.stderr)

    def log(self) -> str:
        """The server's last log lines (its stderr), through its end once it has exited."""
        if self.proc.poll() is not None:
            self._reader.join(10)  # its forked processes hold the pipe until they are gone too
        return "".join(self._log_lines)

    def kill(self) -> int:
        """SIGKILL the server; returns how many snapshot writers it had forked then (they must die with it)."""
        writers = [pid for pid in self.processes() if pid != self.proc.pid]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 5
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.processes(), f"processes of the killed server still run: {self.processes()}"
        return len(writers)

    def processes(self) -> list[int]:
        """Live processes running this server's command line: the server and its forked snapshot writers."""
        mine = f"--port\0{self.port}\0".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and mine in (entry / "cmdline").read_bytes() and (entry / "stat").read_text().split(") ")[1][0] != "Z":
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
        return pids


class Writer(threading.Thread):
    """Upserts one or two new items, or deletes one of its acknowledged ones, until the server dies."""

    def __init__(self, server: Server, number: int, round_: int, state: dict, rng: random.Random):
        super().__init__(daemon=True)
        self.server, self.number, self.round, self.state, self.rng = server, number, round_, state, rng
        self.modality = "audio" if number % 2 else "visual"
        self.acked: list[tuple[str, object]] = []  # (id, metadata or GONE), in order
        self.unanswered: list[tuple[str, object]] | None = None  # the change in flight when the server died
        self.stop = threading.Event()  # or until this is set

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        mine = [i for i, v in self.state[self.modality].items() if v != GONE and i.startswith(f"w{self.number}-")]
        n = 0
        while not self.stop.is_set():
            if mine and self.rng.random() < 0.3:
                item_id = mine.pop(self.rng.randrange(len(mine)))
                change, call = [(item_id, GONE)], ("DELETE", f"/v1/items/{self.modality}/{item_id}", None)
            else:
                ids = [f"w{self.number}-{self.round}-{n}-{j}" for j in range(self.rng.choice((1, 2)))]
                n += 1
                vectors = np.random.default_rng(zlib.crc32(ids[0].encode())).standard_normal((len(ids), DIMS[self.modality]))
                items = [{"id": i, "vector": v.round(5).tolist(), "metadata": {"w": self.number, "id": i}} for i, v in zip(ids, vectors)]
                change, call = [(i, {"id": i, "w": self.number}) for i in ids], ("POST", f"/v1/items/{self.modality}", {"items": items})
            try:
                status, body = self.server.request(*call, conn=conn)
            except (OSError, http.client.HTTPException):  # the server was killed: this change may or may not have landed
                self.unanswered = change
                return
            assert status == 200, (status, body)
            self.acked.extend(change)
            mine.extend(i for i, v in change if v != GONE)


def _check(server: Server, state: dict[str, dict[str, object]], base_sizes: dict[str, int]) -> int:
    """Every id in ``state`` as expected (metadata, or absent); returns how many were checked."""
    checked = 0
    for modality, expected in state.items():
        live = sorted(i for i, v in expected.items() if v != GONE)
        for start in range(0, len(live), 1024):  # a same-modality search by stored id finds the item itself first, with its metadata
            batch = live[start : start + 1024]
            status, body = server.request("POST", "/v1/search", {"modality": modality, "target": modality, "ids": batch, "top_k": 1})
            assert status == 200, (status, body)
            for item_id, hits in zip(batch, body["results"]):
                assert hits[0]["id"] == item_id and hits[0]["metadata"] == expected[item_id], (item_id, hits[0], expected[item_id])
            checked += len(batch)
        status, info = server.request("GET", "/v1/info")
        assert info["index_sizes"][modality] == base_sizes[modality] + len(live)  # so no deleted id is back, and nothing else arrived
        checked += len(expected) - len(live)
    return checked


def test_acknowledged_changes_survive_random_kills(tiny, tmp_path):
    index_dir = copy_index(tiny, tmp_path / "index")
    rng = random.Random(11)
    state: dict[str, dict[str, object]] = {"audio": {}, "visual": {}}
    started = time.monotonic()
    server = Server(tiny.model_dir, index_dir)
    base_sizes = server.request("GET", "/v1/info")[1]["index_sizes"]
    kills_in_snapshot, kills_while_writing, acked_total, checks = 0, 0, 0, 0
    for round_ in range(KILLS):
        writers = [Writer(server, w, round_, state, random.Random(rng.random())) for w in range(WRITERS)]
        for w in writers:
            w.start()
        time.sleep(rng.uniform(0.1, 0.6))
        kills_while_writing += server.kill() > 0
        for w in writers:
            w.join(30)
            assert not w.is_alive()
        # Was a snapshot under way? Its staging copy, or a log not yet truncated after its rotation.
        debris = [p.name for p in index_dir.iterdir() if p.name.startswith(".")]
        segments = [len(list((index_dir / "wal" / m).glob("*.wal"))) for m in DIMS]
        kills_in_snapshot += bool(debris) or max(segments) > 1
        for w in writers:
            for item_id, value in w.acked:
                state[w.modality][item_id] = value
            acked_total += len(w.acked)
        server = Server(tiny.model_dir, index_dir)
        for w in writers:  # an unanswered change: all of it or none of it
            if w.unanswered:
                found = [server.request("GET", f"/v1/items/{w.modality}/{i}") for i, _ in w.unanswered]
                landed = [(s == 200 and b["metadata"] == v) or (s == 404 and v == GONE) for (i, v), (s, b) in zip(w.unanswered, found)]
                assert all(landed) or not any(landed), (w.unanswered, found)
                if all(landed):
                    state[w.modality].update(w.unanswered)
        checks += _check(server, state, base_sizes)
        status, body = server.request("POST", "/v1/search", {"modality": "audio", "vectors": [[0.1] * 128], "top_k": 5})
        assert status == 200 and len(body["results"][0]) == 5
    server.kill()
    elapsed = time.monotonic() - started
    print(
        f"\ncrash test: {KILLS} kills ({kills_in_snapshot} during a snapshot, {kills_while_writing} while a forked writer wrote one), "
        f"{acked_total} acknowledged changes, {checks} item checks, {elapsed:.1f} s"
    )
    assert acked_total > 200 and kills_in_snapshot >= 3
    assert sum(v != GONE for s in state.values() for v in s.values()) > 100 and any(v == GONE for s in state.values() for v in s.values())


DAMAGES = ["none", "zero tail", "flipped byte in record 2", "zeroed record 2", "split, no damage", "bad frame ending an older segment"]


def _damage(segment: Path, how: str) -> tuple[Path, int] | None:
    """Damage the three-record segment ``segment``; returns the file and offset a refusal must name."""
    from store.wal import FRAME

    blob = segment.read_bytes()
    offsets = [0]
    while (end := offsets[-1] + FRAME.size + FRAME.unpack_from(blob, offsets[-1])[0]) < len(blob):
        offsets.append(end)
    assert len(offsets) == 3
    if how == "zero tail":  # a power cut after the file grew, before its data reached the disk
        segment.write_bytes(blob + bytes(8192))
    elif how == "flipped byte in record 2":
        at = (offsets[1] + offsets[2]) // 2
        segment.write_bytes(blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :])
        return segment, offsets[1]
    elif how == "zeroed record 2":
        segment.write_bytes(blob[: offsets[1]] + bytes(offsets[2] - offsets[1]) + blob[offsets[2] :])
        return segment, offsets[1]
    elif how.startswith("split") or how.startswith("bad frame"):  # records 1-2, then 3 in a newer segment (a fold whose save failed)
        segment.write_bytes(blob[: offsets[2]])
        (segment.parent / f"{int(segment.stem) + 2:020d}.wal").write_bytes(blob[offsets[2] :])
        if how.startswith("bad frame"):
            at = offsets[1] + FRAME.size + 2
            segment.write_bytes(blob[:at] + bytes([blob[at] ^ 0x80]) + blob[at + 1 : offsets[2]])
            return segment, offsets[1]
    return None


def test_a_damaged_log_never_loses_an_acknowledged_change_quietly(tiny, tmp_path):
    pristine = copy_index(tiny, tmp_path / "pristine")
    server = Server(tiny.model_dir, pristine, AVSEARCH_WAL_SNAPSHOT_BYTES=str(2**30), AVSEARCH_WAL_SNAPSHOT_SECONDS="3600")
    ids = [f"acked-{i}" for i in range(3)]
    for i, item_id in enumerate(ids):  # one request each: three records, each acknowledged
        vector = np.random.default_rng(i).standard_normal(DIMS["audio"]).round(5).tolist()
        assert server.request("POST", "/v1/items/audio", {"items": [{"id": item_id, "vector": vector, "metadata": {"i": i}}]})[0] == 200
    server.kill()
    outcomes = {}
    for how in DAMAGES:
        index_dir = Path(shutil.copytree(pristine, tmp_path / how.replace(" ", "-")))
        [segment] = (index_dir / "wal" / "audio").glob("*.wal")
        refusal = _damage(segment, how)
        try:
            restarted = Server(tiny.model_dir, index_dir)
        except AssertionError as err:  # it exited: the error line must say where the log is damaged
            assert refusal is not None, f"{how}: refused to start although every change is readable: {err}"
            path, offset = refusal
            assert f"{path.resolve()}: bad record at byte {offset}" in str(err) and "not a torn tail" in str(err), (how, str(err)[-1500:])
            outcomes[how] = f"refused, naming byte {offset}"
            continue
        assert refusal is None, f"{how}: started although the log is damaged"
        for i, item_id in enumerate(ids):
            status, body = restarted.request("GET", f"/v1/items/audio/{item_id}")
            assert status == 200 and body["metadata"] == {"i": i}, (how, item_id, status, body)
        restarted.kill()
        outcomes[how] = "served all 3"
    print("\ndamaged logs:", outcomes)
