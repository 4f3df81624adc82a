"""Every error class, each raised from a real answer of a real server, carrying status and message."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from avsearch_client import (
    AvsearchError,
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    Forbidden,
    IncompatibleServer,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from tests.client.conftest import DIMS, start_server
from tests.service.browser import free_port

WRITE_KEY, READ_KEY = "write-key-0123456789", "read-key-0123456789"


@pytest.fixture(scope="module")
def keyed(tiny, tmp_path_factory):
    s = start_server(tiny, tmp_path_factory.mktemp("keyed"), api_key=WRITE_KEY, read_api_key=READ_KEY)
    yield s
    s.stop()


def raised(call, cls: type[AvsearchError], status: int, words: str) -> AvsearchError:
    with pytest.raises(cls) as caught:
        call()
    err = caught.value
    assert type(err) is cls and err.status == status, err
    assert words in err.message, err.message
    assert f"HTTP {status}" in str(err)
    return err


def test_statuses_of_the_open_server(server, tmp_path):
    client = Client(server.url, retries=0)
    audio = np.ones((1, DIMS["audio"]), np.float32)
    raised(lambda: client.request("POST", "/v1/search", content=b'{"modality": ', headers={"Content-Type": "application/json"}), BadRequest, 400, "malformed JSON")
    raised(lambda: client.request("POST", "/v1/search", content=b"hello", headers={"Content-Type": "text/plain"}), UnsupportedMediaType, 415, "Content-Type")
    err = raised(lambda: client.search("audio", np.ones((1, 5), np.float32)), InvalidRequest, 422, "128")
    assert isinstance(err, BadRequest)  # a 422 is a kind of bad request
    raised(lambda: client.search("audio", audio, top_k=1000), InvalidRequest, 422, "top_k")
    raised(lambda: client.search("audio", np.full((1, DIMS["audio"]), np.nan)), InvalidRequest, 422, "NaN")
    raised(lambda: client.get("visual", "no-such-item"), NotFound, 404, "no-such-item")
    raised(lambda: client.delete("visual", "no-such-item"), NotFound, 404, "no-such-item")
    raised(lambda: client.search("audio", ids=["no-such-item"]), NotFound, 404, "no-such-item")
    raised(lambda: client.download_snapshot("20200101T000000-000000-000000000000", tmp_path / "x.tar"), NotFound, 404, "no snapshot")
    missing = server.index.parent / "no-such-model"  # under the reload roots, but not a model
    raised(lambda: client.reload(model_dir=missing), Conflict, 409, "the current one keeps serving")
    huge = {"blob": "x" * 500_000}  # one item over the 400 000-byte body limit: sent alone, refused
    raised(lambda: client.upsert("audio", ["big"], audio, [huge]), PayloadTooLarge, 413, "AVSEARCH_MAX_BODY_BYTES")
    raised(lambda: client.request("POST", "/v1/search", json={"modality": "audio", "vectors": [[0.0] * 128] * 65}), PayloadTooLarge, 413, "AVSEARCH_MAX_VECTORS")


def test_keys(keyed):
    raised(lambda: Client(keyed.url, api_key="", retries=0).info(), Unauthorized, 401, "Authorization")
    raised(lambda: Client(keyed.url, api_key="not-the-key", retries=0).info(), Forbidden, 403, "not accepted")
    reader = Client(keyed.url, api_key=READ_KEY, retries=0)
    assert reader.search("audio", np.ones(DIMS["audio"]), top_k=1)[0][0].id
    raised(lambda: reader.upsert("audio", ["x"], np.ones(DIMS["audio"])), Forbidden, 403, "read-only")
    raised(lambda: reader.create_snapshot(), Forbidden, 403, "read-only")
    assert Client(keyed.url, api_key=WRITE_KEY).upsert("audio", ["x"], np.ones(DIMS["audio"])).upserted == 1


def test_the_key_comes_from_the_environment(keyed, monkeypatch):
    monkeypatch.setenv("AVSEARCH_API_KEY", WRITE_KEY)
    with Client(keyed.url) as writer:  # the read-write key, from the environment
        writer.upsert("audio", ["env-x"], np.ones(DIMS["audio"]))
        assert writer.delete("audio", "env-x").id == "env-x"
    monkeypatch.delenv("AVSEARCH_API_KEY")
    raised(lambda: Client(keyed.url, retries=0).info(), Unauthorized, 401, "Authorization")


class Impostor(BaseHTTPRequestHandler):
    """Another HTTP server: 404 everywhere, or an avsearch of another API version at /v1/info."""

    info: dict | None = None

    def do_GET(self) -> None:
        body = json.dumps(self.info if self.info is not None and self.path == "/v1/info" else {"detail": "Not Found"}).encode()
        self.send_response(200 if self.info is not None and self.path == "/v1/info" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("info", [None, "v2"])
def test_another_server_is_named_clearly(server, info):
    handler = type("Handler", (Impostor,), {"info": None if info is None else {**Client(server.url).info().raw, "api_version": 2}})
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(IncompatibleServer, match="v2; this client" if info else "does not serve the avsearch API v1"):
            Client(f"http://127.0.0.1:{httpd.server_port}").search("audio", np.ones(DIMS["audio"]))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_nobody_listening():
    with pytest.raises(ConnectionFailed, match="Connection refused|ConnectError") as caught:
        Client(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01).health()
    assert caught.value.status is None
