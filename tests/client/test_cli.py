"""``python -m avsearch_client`` against a real server: tables, --json, and errors as exit code 2 + one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from avsearch_client import Client
from tests.client.conftest import DIMS, REPO


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'client'}"}
    return subprocess.run([sys.executable, "-m", "avsearch_client", *args], capture_output=True, text=True, env=env, timeout=120)


def test_search_upsert_info_snapshot(server, tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(2, DIMS["audio"])).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    url = ("--url", server.url)

    out = cli("search", *url, "--audio", str(tmp_path / "q.npy"), "--top-k", "3", "--json")
    assert out.returncode == 0, out.stderr
    expected = Client(server.url).search("audio", queries, top_k=3)
    assert [[h["id"] for h in hits] for hits in json.loads(out.stdout)["results"]] == expected.ids.tolist()
    table = cli("search", *url, "--audio", str(tmp_path / "q.npy"), "--top-k", "3")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["query", "rank", "id", "score", "metadata"]
    assert expected[1][2].id in table.stdout.splitlines()[6]
    by_id = cli("search", *url, "--ids", "clip-000004", "--modality", "visual", "--target", "visual", "--top-k", "1", "--json")
    assert json.loads(by_id.stdout)["results"][0][0]["id"] == "clip-000004"

    features = rng.normal(size=(5, DIMS["visual"])).astype(np.float32)
    np.save(tmp_path / "features.npy", features)
    (tmp_path / "ids.txt").write_text("".join(f"cli-{i}\n" for i in range(5)))
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps({"n": i}) + "\n" for i in range(5)))
    up = cli("upsert", *url, "--visual", str(tmp_path / "features.npy"), "--ids", str(tmp_path / "ids.txt"), "--metadata", str(tmp_path / "meta.jsonl"), "--json")
    assert up.returncode == 0 and json.loads(up.stdout)["upserted"] == 5, up.stderr
    assert Client(server.url).get("visual", "cli-3").metadata == {"n": 3}
    got = json.loads(cli("get", *url, "visual", "cli-3", "--json").stdout)
    assert got["metadata"] == {"n": 3} and len(got["embedding"]) == 8

    info = cli("info", *url)
    assert info.returncode == 0 and Client(server.url).info().model in info.stdout
    created = json.loads(cli("snapshot", "create", *url, "--json").stdout)
    listed = cli("snapshot", "list", *url)
    assert created["name"] in listed.stdout
    down = cli("snapshot", "download", created["name"], "--out", str(tmp_path / "b.tar"), *url)
    assert down.returncode == 0 and (tmp_path / "b.tar").stat().st_size == created["bytes"]
    assert cli("snapshot", "delete", created["name"], *url).returncode == 0
    assert cli("delete", *url, "visual", "cli-3").returncode == 0


def test_errors_are_one_line_and_exit_2(server, tmp_path):
    np.save(tmp_path / "narrow.npy", np.ones((1, 5), np.float32))
    for args, words in [
        (("search", "--url", server.url, "--audio", str(tmp_path / "narrow.npy")), "HTTP 422"),
        (("get", "--url", server.url, "audio", "no-such-id"), "HTTP 404"),
        (("search", "--url", server.url, "--audio", str(tmp_path / "missing.npy")), "No such file"),
        (("search", "--url", server.url), "exactly one of --audio"),
        (("snapshot", "download", "--url", server.url), "needs the snapshot's name"),
    ]:
        out = cli(*args)
        assert out.returncode == 2 and out.stdout == "", out
        assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: ") and words in out.stderr, out.stderr
