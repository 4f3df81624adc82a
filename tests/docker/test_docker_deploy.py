"""The deployment for real: the built images and the compose flow on a Docker engine.

Run by `make docker-test` (docker/test.sh), which starts an engine if none runs, builds
avsearch:cpu and avsearch:train and sets the AVSEARCH_DOCKER_* variables read here; `make test`
needs no engine and leaves this folder out (tests/conftest.py). Here nothing is skipped: a missing
engine, image or variable fails.

Flow: trainer (tiny preset) -> one-shot indexer -> API healthy on /readyz -> a search answers k hits
from the indexed collection -> an upsert -> `restart api` -> the upsert is still served -> `down -v`.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_IMAGE, TRAIN_IMAGE = "avsearch:cpu", "avsearch:train"


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests through `make docker-test` (docker/test.sh)", pytrace=False)
    return value


def run(*args: str, timeout: float = 600, check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(extra_env or {})})
    if check and out.returncode != 0:
        pytest.fail(f"{shlex.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}", pytrace=False)
    return out


def in_image(image: str, code: str) -> subprocess.CompletedProcess:
    return run("docker", "run", "--rm", "--entrypoint", "python", image, "-c", code, check=False, timeout=120)


def inspect(image: str) -> dict:
    return json.loads(run("docker", "image", "inspect", image).stdout)[0]


@pytest.fixture(scope="module", autouse=True)
def images():
    if run("docker", "info", check=False, timeout=60).returncode != 0:
        pytest.fail("no Docker engine answers: make docker-test starts one", pytrace=False)
    for image in (API_IMAGE, TRAIN_IMAGE):
        if run("docker", "image", "inspect", image, check=False).returncode != 0:
            pytest.fail(f"image {image} is missing: make docker-test builds it", pytrace=False)


def test_api_image_has_no_torch_and_no_training():
    out = in_image(
        API_IMAGE,
        "import importlib.util as u, os, sys\n"
        "import json, avdata.features, index.store, store.collection, service.app, service.__main__  # what the API and indexer import\n"
        "print(json.dumps({'torch': u.find_spec('torch') is not None, 'training': u.find_spec('training') is not None,"
        " 'dirs': sorted(os.listdir('/app')), 'loaded': [m for m in sys.modules if m.split('.')[0] in ('torch', 'training')]}))",
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"torch": False, "training": False, "dirs": ["avdata", "index", "service", "store"], "loaded": []}, found


def test_api_image_runs_unprivileged_without_installers_or_compilers():
    config = inspect(API_IMAGE)["Config"]
    assert config["User"] == "10001:10001"
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "avsearch" and labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert len(labels["org.opencontainers.image.revision"]) in (7, 40) or labels["org.opencontainers.image.revision"] == "unknown"
    out = run("docker", "run", "--rm", "--entrypoint", "sh", API_IMAGE, "-c",
              "id -u; for t in pip pip3 gcc cc g++ make; do command -v $t || true; done; "
              "ls -d /root/.cache /home/avsearch/.cache /opt/venv/lib/python3*/site-packages/pip 2>/dev/null || true")
    assert out.stdout.split() == ["10001"], out.stdout  # uid, and none of the tools or caches


def test_trainer_image_has_cpu_torch():
    out = in_image(TRAIN_IMAGE, "import torch, training.export; print(torch.__version__, torch.version.cuda)")
    assert out.returncode == 0, out.stderr
    version, cuda = out.stdout.split()
    assert version.startswith("2.13.0") and cuda == "None", out.stdout
    assert inspect(TRAIN_IMAGE)["Config"]["User"] == "10001:10001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Compose:
    def __init__(self):
        self.command = shlex.split(env("AVSEARCH_DOCKER_COMPOSE"))
        self.project = env("AVSEARCH_DOCKER_PROJECT")
        self.data = Path(env("AVSEARCH_DOCKER_DATA"))
        self.port = free_port()
        self.key = secrets.token_hex(16)
        # Writes need a key (the API binds 0.0.0.0); reads then need one too.
        # Two worker processes (AVSEARCH_WORKERS): the image serves one index from both.
        self.env = {"AVSEARCH_DATA": str(self.data), "AVSEARCH_TRAIN_CONFIG": "tiny", "AVSEARCH_PORT": str(self.port), "AVSEARCH_API_KEY": self.key, "AVSEARCH_WORKERS": "2"}
        self.base = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return run(*self.command, "-p", self.project, *args, timeout=timeout, check=check, extra_env=self.env)

    def container(self, service: str) -> str:
        ids = self("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def wait_healthy(self, service: str, timeout: float = 180) -> None:
        container = self.container(service)
        deadline = time.monotonic() + timeout
        while True:
            state = json.loads(run("docker", "inspect", "-f", "{{json .State}}", container).stdout)
            status = state.get("Health", {}).get("Status")
            if status == "healthy":
                return
            if time.monotonic() > deadline or not state["Running"]:
                logs = run("docker", "logs", "--tail", "40", container, check=False)
                pytest.fail(f"{service} not healthy (status {status}, running {state['Running']}):\n{logs.stdout}{logs.stderr}", pytrace=False)
            time.sleep(1)


def _one_client_per_worker(compose: Compose, count: int) -> list[httpx.Client]:
    """Keep-alive clients, one on each of ``count`` worker processes (``/healthz`` names the one answering)."""
    found: dict[str, httpx.Client] = {}
    for _ in range(200):
        client = httpx.Client(base_url=compose.base, timeout=10)
        worker = client.get("/healthz").headers["X-Avsearch-Worker"]
        if worker in found:
            client.close()
        else:
            found[worker] = client
        if len(found) == count:
            return list(found.values())
    pytest.fail(f"the connections reached only workers {sorted(found)}", pytrace=False)


@pytest.fixture(scope="module")
def compose():
    deployment = Compose()
    try:
        yield deployment
    finally:
        deployment("--profile", "train", "down", "-v", "--remove-orphans", check=False)
        label = f"label=com.docker.compose.project={deployment.project}"
        left = {kind: run("docker", kind, "ls", "-q", *(["-a"] if kind == "container" else []), "--filter", label).stdout.split() for kind in ("container", "volume", "network")}
        assert left == {"container": [], "volume": [], "network": []}, f"left behind by `down -v`: {left}"


def test_compose_flow_trains_indexes_serves_and_keeps_an_upsert_across_a_restart(compose):
    timings = {}
    ids = set((compose.data / "ids.txt").read_text().split())

    t = time.monotonic()
    compose("--profile", "train", "run", "--rm", "trainer", timeout=900)  # exits 0 or fails the test with its output
    timings["trainer (tiny preset): train + export"] = time.monotonic() - t

    t = time.monotonic()
    compose("up", "-d", "--no-build")  # the indexer runs first and must exit 0 (service_completed_successfully)
    compose.wait_healthy("api")
    timings["up -d: indexer, then API healthy on /readyz"] = time.monotonic() - t
    indexer = compose("ps", "-q", "indexer").stdout.split()
    assert len(indexer) == 1 and run("docker", "inspect", "-f", "{{.State.ExitCode}}", indexer[0]).stdout.strip() == "0"
    assert "built audio: 600 items, visual: 600 items" in run("docker", "logs", indexer[0]).stdout

    assert httpx.get(f"{compose.base}/readyz", timeout=10).status_code == 200
    info = httpx.get(f"{compose.base}/v1/info", headers=compose.headers, timeout=10).json()
    # the trainer's model (tiny preset, the data's widths), indexed whole, on the CPU image's provider
    assert info["manifest"]["input_dims"] == {"audio": 128, "visual": 1024} and info["index_sizes"] == {"audio": len(ids), "visual": len(ids)}, info
    assert set(info["providers"].values()) == {"CPUExecutionProvider"}, info["providers"]
    query = json.loads(run(os.environ.get("PYTHON", str(REPO / ".venv/bin/python")), "-m", "service", "example", "--data", str(compose.data), "--out", "/dev/stdout").stdout)
    t = time.monotonic()
    r = httpx.post(f"{compose.base}/v1/search", json={**query, "top_k": 7}, headers=compose.headers, timeout=30)
    timings["first search"] = time.monotonic() - t
    assert r.status_code == 200, r.text
    hits = r.json()["results"][0]
    assert len(hits) == 7 and {h["id"] for h in hits} <= ids, hits  # k hits, all from the indexed collection
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert r.json()["model"] == info["model"]

    width = len(httpx.get(f"{compose.base}/v1/items/visual/{sorted(ids)[0]}", headers=compose.headers, timeout=10).json()["embedding"])
    item = {"id": "docker-test-item", "vector": [0.01 * (i % 7) for i in range(1024)], "metadata": {"source": "docker-test"}}
    r = httpx.post(f"{compose.base}/v1/items/visual", json={"items": [item]}, headers=compose.headers, timeout=30)
    assert r.status_code == 200 and r.json()["upserted"] == 1 and r.json()["count"] == len(ids) + 1, r.text
    before = httpx.get(f"{compose.base}/v1/items/visual/docker-test-item", headers=compose.headers, timeout=10).json()
    assert before["metadata"] == {"source": "docker-test"} and len(before["embedding"]) == width
    for worker in _one_client_per_worker(compose, 2):  # the change is there through each worker process
        assert worker.get("/v1/items/visual/docker-test-item", headers=compose.headers).json() == before
        worker.close()

    t = time.monotonic()
    compose("restart", "api")
    compose.wait_healthy("api")
    timings["restart api: healthy again"] = time.monotonic() - t
    r = httpx.get(f"{compose.base}/v1/items/visual/docker-test-item", headers=compose.headers, timeout=10)
    assert r.status_code == 200, f"the upsert did not survive `restart api`: {r.status_code} {r.text}"
    assert r.json() == before
    found = httpx.post(f"{compose.base}/v1/search", json={"modality": "visual", "target": "visual", "vectors": [item["vector"]], "top_k": 1}, headers=compose.headers, timeout=30)
    assert found.status_code == 200 and found.json()["results"][0][0]["id"] == "docker-test-item", found.text

    t = time.monotonic()
    compose("--profile", "train", "down", "-v", "--remove-orphans")
    timings["down -v"] = time.monotonic() - t
    lines = [f"{name:<46} {seconds:7.2f} s" for name, seconds in timings.items()]
    Path(env("AVSEARCH_DOCKER_TIMINGS")).write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
