"""Issue 21, the HTTP edge: keys under a URL prefix, huge integers, bodies bounded and parsed off the
event loop, cross-site requests, per-request caps, connection timeouts, and the low items."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from fastapi import HTTPException
from pydantic import BaseModel, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from service.app import create_app
from service.bodies import parse_json
from service.batching import EmbedJob, SearchJob, run_batch
from store.collection import Collection
from service.schemas import EmbedRequest, UpsertRequest
from service.settings import Settings
from tests.service.conftest import LOCAL_CLIENT, copy_index, make_client, wait_ready

REPO = Path(__file__).resolve().parents[2]
A = [0.1] * 128
SEARCH = {"modality": "audio", "vectors": [A], "top_k": 3}


def upsert(item_id: str, **metadata) -> dict:
    return {"items": [{"id": item_id, "vector": A, "metadata": metadata or None}]}


@pytest.fixture(scope="module")
def index_dir(tiny, tmp_path_factory):
    return copy_index(tiny, tmp_path_factory.mktemp("edge") / "index")


@pytest.fixture(scope="module")
def open_client(tiny, index_dir):
    with make_client(tiny, index_dir, max_vectors=8, max_top_k=50, max_hits=100, max_metadata_bytes=1000) as c:
        wait_ready(c)
        yield c


# --- 1. keys decide on the routed path, and fail closed -------------------------------------------
@pytest.fixture(scope="module")
def keyed_app(tiny, tmp_path_factory):
    index_dir = copy_index(tiny, tmp_path_factory.mktemp("prefix") / "index")
    settings = Settings(model_dir=tiny.model_dir, index_dir=index_dir, api_key="rw-key", read_api_key="ro-key")
    return create_app(settings, Collection.load(settings.model_dir, settings.index_dir, device="cpu"))


def _ready(client: TestClient, prefix: str = "") -> None:
    """Each TestClient of the shared app starts its lifespan again, which loads the version again."""
    deadline = time.monotonic() + 30
    while client.get(prefix + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not ready after 30 s"
        time.sleep(0.02)


def test_keys_hold_when_the_app_is_mounted_under_a_prefix(keyed_app):
    outer = Starlette(routes=[Mount("/api", app=keyed_app)])
    with TestClient(outer, base_url="http://localhost", client=LOCAL_CLIENT) as c:
        _ready(c, "/api")
        assert c.get("/api/v1/info").status_code == 401
        assert c.post("/api/v1/admin/reload", json={}).status_code == 401
        assert c.post("/api/v1/items/audio", json=upsert("p1")).status_code == 401
        assert c.post("/api/v1/items/audio", json=upsert("p1"), headers={"Authorization": "Bearer ro-key"}).status_code == 403
        assert c.get("/api/v1/info", headers={"Authorization": "Bearer ro-key"}).status_code == 200
        assert c.get("/api/healthz").status_code == 200  # probes stay open


def test_keys_hold_under_uvicorns_root_path(keyed_app):
    with TestClient(keyed_app, base_url="http://localhost", client=LOCAL_CLIENT, root_path="/api") as c:  # uvicorn --root-path /api
        _ready(c, "/api")
        assert c.get("/api/v1/info").status_code == 401
        assert c.post("/api/v1/admin/reload", json={}).status_code == 401
        assert c.get("/api/v1/info", headers={"Authorization": "Bearer ro-key"}).status_code == 200


def test_an_unknown_path_needs_a_key():
    from service.auth import access_needed

    assert access_needed("GET", "/healthz") is None and access_needed("GET", "/ui/console.js") is None
    assert access_needed("GET", "/docs") is None and access_needed("GET", "/openapi.json") is None
    assert access_needed("GET", "/v2/info") == "read"  # not a known open route: a key
    assert access_needed("GET", "//v1/info") == "read"
    assert access_needed("POST", "/v2/items/audio") == "write"
    assert access_needed("POST", "/healthz") == "write"  # open routes are open to reads only
    assert access_needed("POST", "/v1/search") == "read"


# --- 2. huge integers are refused at the door; one job's failure stays with that job ----------------
def test_integers_past_64_bits_are_refused(open_client):
    for value in (2**70, -(2**64), 2**63):
        r = open_client.post("/v1/items/audio", content=json.dumps(upsert("big", n={"deep": [value]})), headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert "64 bits" in r.json()["detail"]
    assert open_client.post("/v1/items/audio", json=upsert("big-ok", n=2**63 - 1, m=-(2**63))).status_code == 200
    assert open_client.get("/v1/items/audio/big").status_code == 404


def test_one_failing_job_does_not_fail_its_batch(tiny, tmp_path):
    """A stored integer past 64 bits (logged before the door refused them) and a job that breaks
    the whole encoder call: the other jobs of the micro-batch still get their answers."""
    from service.batching import MicroBatcher

    collection = Collection.load(tiny.model_dir, copy_index(tiny, tmp_path / "index"), device="cpu")
    try:
        query = np.asarray([A], np.float32)
        collection.upsert("visual", np.asarray([[0.1] * collection.embedder.input_dims["visual"]], np.float32), ["huge"], [{"n": 2**70}])
        returns_it = SearchJob("visual", "visual", 1, ids=["huge"])
        unrelated = SearchJob("audio", "visual", 3, query, filter={"n": 1})
        results = run_batch(collection, [returns_it, unrelated])
        assert json.loads(results[1])["results"] == [[]]
        assert json.loads(results[0])["results"][0][0]["metadata"] == {"n": 2**70}  # readable, not a 500

        async def batch() -> list:
            batcher = MicroBatcher(window_s=0.05, max_batch=64)
            batcher.start()
            try:
                broken = EmbedJob("smell", query)  # no such encoder: the whole encoder call raises
                return await asyncio.gather(*(batcher.submit(collection, job) for job in (SearchJob("audio", "visual", 2, query), broken, EmbedJob("audio", query))), return_exceptions=True)
            finally:
                await batcher.stop()

        searched, failed, embedded = asyncio.run(batch())
        assert isinstance(failed, Exception)
        assert len(json.loads(searched)["results"][0]) == 2
        assert embedded.shape == (1, collection.embedder.embedding_dim)
    finally:
        collection.close()


# --- 4. JSON bodies: bounded by what their rows can need, parsed off the event loop ------------------
def test_a_json_body_is_bounded_by_what_its_rows_need(open_client):
    padded = json.dumps(SEARCH) + " " * 400_000  # one valid query padded past max_vectors x width
    r = open_client.post("/v1/search", content=padded, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "AVSEARCH_MAX_VECTORS" in r.json()["detail"]
    assert open_client.post("/v1/search", json={**SEARCH, "vectors": [A] * 8}).status_code == 200  # the largest valid body still fits


class PidProbe(BaseModel):
    """Notes the process that validated it."""

    x: int
    pid: int = 0

    @model_validator(mode="after")
    def _where(self) -> "PidProbe":
        self.pid = os.getpid()
        return self


def _parse(body: bytes, model):
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def parse():
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"application/json")]}, receive)
        return await parse_json(request, model)

    return asyncio.run(parse())


def test_a_large_json_body_is_validated_off_the_event_loop():
    """Pydantic holds the GIL while it validates (0.4 s for 20 MB), so off the loop means another process."""
    padding = "." * 300_000  # large enough to be worth the trip
    assert _parse(json.dumps({"x": 1, "padding": padding}).encode(), PidProbe).pid not in (0, os.getpid())
    assert _parse(json.dumps({"x": 1}).encode(), PidProbe).pid == os.getpid()  # a small one stays here
    with pytest.raises(HTTPException) as refused:
        _parse(json.dumps({"x": "one", "padding": padding}).encode(), PidProbe)
    assert refused.value.status_code == 422 and "body.x" in refused.value.detail
    vectors = np.random.default_rng(0).standard_normal((64, 1024))
    parsed = _parse(json.dumps({"modality": "visual", "vectors": vectors.tolist()}).encode(), EmbedRequest)
    assert isinstance(parsed.vectors, np.ndarray) and np.array_equal(parsed.vectors, vectors.astype(np.float32))  # sent back as an array
    items = _parse(json.dumps({"items": [{"id": "a", "vector": row} for row in vectors.tolist()]}).encode(), UpsertRequest).items
    assert np.array_equal(np.stack([item.vector for item in items]), vectors.astype(np.float32))


# --- 7. cross-site requests ------------------------------------------------------------------------
def test_admin_posts_need_a_json_content_type(open_client):
    for path in ("/v1/admin/reload", "/v1/admin/snapshots"):
        r = open_client.post(path)  # what a cross-site form or fetch(no-cors) can send
        assert r.status_code == 415, r.text
        assert "application/json" in r.json()["detail"]


def test_a_foreign_origin_cannot_write(open_client):
    r = open_client.post("/v1/items/audio", json=upsert("cross"), headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "Origin" in r.json()["detail"]
    r = open_client.delete("/v1/items/audio/clip-000001", headers={"origin": "null"})
    assert r.status_code == 403
    assert open_client.get("/v1/items/audio/cross").status_code == 404
    assert open_client.post("/v1/items/audio", json=upsert("same"), headers={"origin": "http://localhost"}).status_code == 200  # the console


def test_host_is_checked_against_the_allow_list(open_client, tiny, tmp_path):
    r = open_client.get("/v1/info", headers={"host": "rebound.evil.example"})  # DNS rebinding onto loopback
    assert r.status_code == 421, r.text
    assert "AVSEARCH_ALLOWED_HOSTS" in r.json()["detail"]
    assert open_client.get("/v1/info", headers={"host": "127.0.0.1:8000"}).status_code == 200
    with make_client(tiny, copy_index(tiny, tmp_path / "index"), allowed_hosts="search.example.org") as c:
        wait_ready(c)
        assert c.get("/v1/info", headers={"host": "search.example.org"}).status_code == 200
        assert c.get("/v1/info").status_code == 421  # localhost is not in that list


# --- 9. per-request caps and a float filter without parsing every row -------------------------------
def test_metadata_bytes_per_item_are_capped(open_client):
    r = open_client.post("/v1/items/audio", json=upsert("fat", text="x" * 2000))
    assert r.status_code == 422 and "AVSEARCH_MAX_METADATA_BYTES" in r.json()["detail"]
    assert open_client.post("/v1/items/audio", json=upsert("thin", text="x" * 100)).status_code == 200


def test_hits_per_request_are_capped(open_client):
    r = open_client.post("/v1/search", json={**SEARCH, "vectors": [A] * 3, "top_k": 50})  # 150 hits > 100
    assert r.status_code == 413 and "AVSEARCH_MAX_HITS" in r.json()["detail"]
    assert open_client.post("/v1/search", json={**SEARCH, "vectors": [A] * 2, "top_k": 50}).status_code == 200


def test_a_float_filter_parses_only_candidate_rows():
    from index.items import ItemTable, holds

    class Counting(ItemTable):
        parsed = 0

        def metadata_of(self, labels):
            self.parsed += len(labels)
            return super().metadata_of(labels)

    values = [1.5, 2.5, 0.0, -0.0, 15.0, 1.55, 1]
    meta = {f"i{n}": {"x": values[n % len(values)], "y": {"x": 7.25}} for n in range(700)}
    table = Counting.from_mapping({i: n for n, i in enumerate(meta)}, meta)
    for wanted in (1.5, 0.0, -0.0, 15.0, 1.0):
        table.parsed = 0
        got = table.matching({"x": wanted})
        reference = [n for n, i in enumerate(meta) if holds(meta[i], {"x": wanted})]
        assert got.tolist() == reference
        assert table.parsed <= 200  # the rows holding the text of that number (1.5 and 1.55; 0.0 and -0.0), not all 700


# --- 11. connection, header and body timeouts -----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True  # the server closed (possibly after an answer)
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def test_slow_clients_are_cut_off_and_parsers_go_with_the_server(tiny, tmp_path):
    port = _free_port()
    env = {**os.environ, "AVSEARCH_HEADER_TIMEOUT": "1", "AVSEARCH_BODY_TIMEOUT": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "service", "serve", "--model", str(tiny.model_dir), "--index", str(copy_index(tiny, tmp_path / "index")), "--port", str(port)]
    server = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.2)
        silent = socket.create_connection(("127.0.0.1", port))
        slow_head = socket.create_connection(("127.0.0.1", port))
        slow_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        for sock in (silent, slow_head, slow_body):
            assert _closed_within(sock, 6), "a connection that sends nothing more stayed open"
            sock.close()
        with socket.create_connection(("127.0.0.1", port)) as fine:  # a whole request still gets its answer
            fine.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            fine.settimeout(5)
            assert fine.recv(4096).startswith(b"HTTP/1.1 200")
        # The JSON parser processes go with the server, even when it is killed.
        children = [int(pid) for pid in subprocess.run(["ps", "--ppid", str(server.pid), "-o", "pid="], capture_output=True, text=True).stdout.split()]
        assert children, "no parser processes"
        server.kill()
        server.wait(30)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children):
            assert time.monotonic() < deadline, "parser processes outlived the server"
            time.sleep(0.2)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# --- low items ------------------------------------------------------------------------------------
def test_an_id_with_a_slash_can_be_read_and_deleted(open_client):
    assert open_client.post("/v1/items/audio", json=upsert("album/track 1")).status_code == 200
    assert open_client.get("/v1/items/audio/album/track%201").json()["id"] == "album/track 1"
    assert open_client.delete("/v1/items/audio/album%2Ftrack%201").status_code == 200
    assert open_client.get("/v1/items/audio/album/track%201").status_code == 404


def test_whitespace_around_a_configured_key_is_ignored():
    settings = Settings(api_key=" rw-key\n", read_api_key="\tro-key ")
    assert settings.api_key.get_secret_value() == "rw-key" and settings.read_api_key.get_secret_value() == "ro-key"


def test_anonymous_writes_follow_the_client_address(tiny, tmp_path):
    with make_client(tiny, copy_index(tiny, tmp_path / "index")) as c:  # bound to loopback, no key
        wait_ready(c)
        r = c.post("/v1/items/audio", json=upsert("proxied"), headers={"x-forwarded-for": "203.0.113.9"})  # a same-host proxy
        assert r.status_code == 403 and "AVSEARCH_API_KEY" in r.json()["detail"]
        assert c.get("/v1/access", headers={"forwarded": "for=203.0.113.9"}).json()["access"] == "read-only"
        assert c.post("/v1/items/audio", json=upsert("local")).status_code == 200
    settings = Settings(model_dir=tiny.model_dir, index_dir=copy_index(tiny, tmp_path / "other"))
    with TestClient(create_app(settings), base_url="http://localhost", client=("192.0.2.7", 4000)) as c:
        wait_ready(c)
        assert c.post("/v1/items/audio", json=upsert("remote")).status_code == 403


def test_paths_are_shown_only_to_the_read_write_key(keyed_app):
    with TestClient(keyed_app, base_url="http://localhost", client=LOCAL_CLIENT) as c:
        _ready(c)
        full = c.get("/v1/info", headers={"Authorization": "Bearer rw-key"}).json()
        limited = c.get("/v1/info", headers={"Authorization": "Bearer ro-key"}).json()
    assert full["index_dir"].startswith("/")
    assert not limited["index_dir"].startswith("/") and not limited["model_dir"].startswith("/")
    assert limited["index_dir"] == Path(full["index_dir"]).name


def test_suggestions_of_a_large_index_are_not_sorted_again_after_every_write(tiny, tmp_path):
    from service.suggest import IdSuggester

    collection = Collection.load(tiny.model_dir, copy_index(tiny, tmp_path / "index"), device="cpu")
    try:
        suggester = IdSuggester(rebuild_always_below=0, rebuild_seconds=3600)  # every index counts as large here
        assert suggester.suggest(collection, "audio", "clip-00000", 3).ids == ["clip-000000", "clip-000001", "clip-000002"]
        sorted_list = suggester._sorted["audio"][3]
        collection.upsert("audio", np.asarray([A], np.float32), ["clip-000000a"], [None])
        collection.delete("audio", "clip-000001")
        # The same list (not sorted again): the new id waits for the next rebuild, the deleted one is dropped at once.
        assert suggester.suggest(collection, "audio", "clip-00000", 3).ids == ["clip-000000", "clip-000002", "clip-000003"]
        assert suggester._sorted["audio"][3] is sorted_list
        assert IdSuggester().suggest(collection, "audio", "clip-00000", 2).ids == ["clip-000000", "clip-000000a"]  # small: rebuilt at once
    finally:
        collection.close()


def test_a_failed_loads_reason_is_for_the_read_write_key(tiny, tmp_path):
    missing = tmp_path / "no-index"
    with make_client(tiny, missing, api_key="rw-key", read_api_key="ro-key") as c:
        deadline = time.monotonic() + 30
        while "loading failed" not in c.get("/readyz").text and time.monotonic() < deadline:
            time.sleep(0.05)
        anonymous = c.get("/readyz")
        assert anonymous.status_code == 503 and str(tmp_path) not in anonymous.text and "server log" in anonymous.json()["detail"]
        assert str(tmp_path) not in c.get("/readyz", headers={"Authorization": "Bearer ro-key"}).text
        assert str(missing) in c.get("/readyz", headers={"Authorization": "Bearer rw-key"}).json()["detail"]


def test_an_app_started_again_serves_writes(keyed_app):
    """A lifespan that ended closed its version; one started again (a second TestClient, an ASGI
    server restarting the app) must not write into that closed version's log."""
    for round_ in range(2):
        with TestClient(keyed_app, base_url="http://localhost", client=LOCAL_CLIENT) as c:
            _ready(c)
            r = c.post("/v1/items/audio", json=upsert(f"again-{round_}"), headers={"Authorization": "Bearer rw-key"})
            assert r.status_code == 200, r.text
