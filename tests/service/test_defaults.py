"""Safer defaults: reload only under the configured roots, no anonymous writes off loopback,
artifacts readable per the umask, and a 413 that reaches a client which sends its whole body first."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from index.store import VectorIndex
from tests.service.browser import serving
from tests.service.conftest import copy_index, make_client, wait_ready


@pytest.fixture(scope="module")
def roots_client(tiny, tmp_path_factory):
    index_dir = copy_index(tiny, tmp_path_factory.mktemp("roots") / "index")
    with make_client(tiny, index_dir) as c:  # default roots: the parents of the model and index dirs
        wait_ready(c)
        yield c, index_dir


def test_reload_refuses_paths_outside_the_roots(roots_client, tiny, tmp_path):
    c, index_dir = roots_client
    for body in ({"model_dir": "/etc"}, {"index_dir": str(tmp_path)}, {"model_dir": str(tiny.model_dir / ".." / ".." )}):
        r = c.post("/v1/admin/reload", json=body)
        assert r.status_code == 403, r.text
        assert "outside the directories a reload may load from" in r.json()["detail"] and "AVSEARCH_RELOAD_ROOTS" in r.json()["detail"]
    escape = index_dir.parent / "escape"
    escape.symlink_to(tmp_path)  # inside a root by name, outside once resolved
    assert c.post("/v1/admin/reload", json={"index_dir": str(escape)}).status_code == 403
    inside = c.post("/v1/admin/reload", json={"model_dir": str(tiny.model_dir.parent / "missing")})
    assert inside.status_code == 409 and "manifest.json: missing" in inside.json()["detail"]  # allowed, then not loadable
    ok = c.post("/v1/admin/reload", json={"model_dir": str(tiny.model_dir), "index_dir": str(index_dir)})
    assert ok.status_code == 200, ok.text


def test_reload_roots_setting_widens_them(tiny, tmp_path):
    elsewhere = copy_index(tiny, tmp_path / "elsewhere" / "index")
    served = copy_index(tiny, tmp_path / "served" / "index")
    with make_client(tiny, served, reload_roots=f"{tiny.model_dir.parent}:{elsewhere.parent}") as c:
        wait_ready(c)
        assert c.post("/v1/admin/reload", json={"index_dir": str(elsewhere)}).status_code == 200
        assert c.post("/v1/admin/reload", json={"index_dir": str(served)}).status_code == 403  # not a root any more


ITEM = {"items": [{"id": "anon", "vector": [0.0] * 128}]}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_no_anonymous_writes_off_loopback(tiny, tmp_path, host):
    with make_client(tiny, copy_index(tiny, tmp_path / "index"), host=host) as c:
        wait_ready(c)
        for method, path, body in (("post", "/v1/items/audio", ITEM), ("delete", "/v1/items/audio/x", None), ("post", "/v1/admin/reload", {})):
            r = c.request(method.upper(), path, json=body)
            assert r.status_code == 403, r.text
            assert "AVSEARCH_API_KEY" in r.json()["detail"] and "AVSEARCH_ALLOW_ANONYMOUS_WRITES" in r.json()["detail"]
        assert c.get("/v1/items/audio/anon").status_code == 404  # nothing was written
        assert c.post("/v1/search", json={"modality": "audio", "vectors": [[0.1] * 128]}).status_code == 200  # reads stay open
        assert c.get("/v1/access").json()["access"] == "read-only"  # the console hides its write controls


@pytest.mark.parametrize("overrides", [{"host": "0.0.0.0", "allow_anonymous_writes": True}, {"host": "0.0.0.0", "api_key": "k"}, {"host": "127.0.0.1"}, {"host": "::1"}, {"host": "localhost"}])
def test_writes_allowed_with_a_key_the_explicit_setting_or_on_loopback(tiny, tmp_path, overrides):
    headers = {"Authorization": "Bearer k"} if "api_key" in overrides else {}
    with make_client(tiny, copy_index(tiny, tmp_path / "index"), **overrides) as c:
        wait_ready(c)
        assert c.post("/v1/items/audio", json=ITEM, headers=headers).status_code == 200


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_saved_artifacts_follow_the_umask(tiny, tmp_path, umask, mode):
    index = VectorIndex.load(tiny.index_dir / "audio")
    previous = os.umask(umask)
    try:
        index.save(tmp_path / "saved")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "saved").iterdir()}
    assert modes and set(modes.values()) == {mode}, {k: oct(v) for k, v in modes.items()}


LIMIT = 200_000
BIG = 24 * 1024 * 1024  # far more than the socket buffers hold: the server must read it or reset


def _send_all_then_read(url: str, head: bytes, chunks) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)  # the whole body before reading anything, as urllib does
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def _over_limit_requests():
    body = b"x" * (1024 * 1024)
    sized = b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % BIG
    chunked = b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    return [
        ("content-length", sized, [body] * (BIG // len(body))),
        ("chunked", chunked, [b"%x\r\n" % len(body) + body + b"\r\n"] * (BIG // len(body)) + [b"0\r\n\r\n"]),
    ]


@pytest.fixture(scope="module")
def small_limit_server(tiny, tmp_path_factory):
    index_dir = copy_index(tiny, tmp_path_factory.mktemp("limit") / "index")
    with serving(tiny.model_dir, index_dir, env={"AVSEARCH_MAX_BODY_BYTES": str(LIMIT)}) as url:
        yield url


@pytest.mark.parametrize("name, head, chunks", _over_limit_requests(), ids=[r[0] for r in _over_limit_requests()])
def test_an_over_limit_body_sent_whole_before_reading_gets_its_413(small_limit_server, name, head, chunks):
    answer = _send_all_then_read(small_limit_server, head, chunks)  # a reset raises ConnectionResetError here
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"AVSEARCH_MAX_BODY_BYTES" in answer


def test_a_client_waiting_for_100_continue_gets_its_413_at_once(small_limit_server):
    """curl and friends send the headers and wait: nothing to drain, the 413 comes before any body."""
    host, port = small_limit_server.removeprefix("http://").split(":")
    head = b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % BIG
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        answer = sock.recv(65536)  # a timeout here means the server waited for a body it was not sent
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer, answer[:200]
