"""The deployment: compose files validated by docker-compose, and the images' commands run outside Docker.

No Docker engine is needed: `docker-compose config` checks and resolves the files, and the commands
the containers would run are run here with the container paths (/models, /indexes, /data, /runs)
mapped onto temporary directories and the tiny artifacts. The images themselves are built and run by
`make docker-test` (tests/docker).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NO_COMPOSE = "docker-compose is not on PATH, so the compose files cannot be validated: install it (make test does: apt-get install docker-compose)"


def compose_command() -> str:
    """docker-compose's path; a missing one fails the test that needs it (never a quiet skip)."""
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail(NO_COMPOSE, pytrace=False)
    return found


def compose_config(*files: str, profile: str | None = None) -> dict:
    args = [compose_command(), *(a for f in files for a in ("-f", f))]
    if profile:
        args += ["--profile", profile]
    out = subprocess.run([*args, "config"], cwd=REPO, capture_output=True, text=True, env={**os.environ, "AVSEARCH_API_KEY": ""})
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def dockerfile(target: str, args: dict[str, str] | None = None) -> tuple[str, dict[str, str], list[str]]:
    """(instructions, AVSEARCH_* ENV, CMD) of stage ``target`` of docker/Dockerfile, its parent stages
    included, with ARG defaults (or ``args``, as a build would pass them) substituted."""
    joined = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in joined.splitlines():
        line = line.strip()
        if match := re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)$", line, re.IGNORECASE):
            current = match.group(2)
            stages[current] = (match.group(1), [])
        elif current and line and not line.startswith("#"):
            stages[current][1].append(line)
    assert target in stages, f"docker/Dockerfile has no stage {target!r}: {sorted(stages)}"
    chain, name = [], target
    while name in stages:
        chain.insert(0, name)
        name = stages[name][0]
    lines = [line for name in chain for line in stages[name][1]]
    values, env, cmd = {}, {}, None
    for line in lines:
        if line.startswith("ARG "):
            key, _, default = line[4:].partition("=")
            values[key] = (args or {}).get(key, default)
        elif line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line):
                env[key] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
    # PATH and PYTHONPATH describe the image's layout (/opt/venv, /app): the settings are what carry over.
    return "\n".join(lines), {k: v for k, v in env.items() if k.startswith("AVSEARCH_")}, cmd


@pytest.fixture
def volumes(tiny, tmp_path) -> dict[str, Path]:
    """Container mount points -> host directories: the models volume holds the tiny model as /models/current."""
    mapping = {"/models": tmp_path / "models", "/indexes": tmp_path / "indexes", "/runs": tmp_path / "runs", "/data": tiny.data_dir}
    mapping["/models"].mkdir()
    shutil.copytree(tiny.model_dir, mapping["/models"] / "current")
    return mapping


def remap(value: str, volumes: dict[str, Path]) -> str:
    """Replace container paths by host paths, inside any string (a `sh -c` line included)."""
    for container, host in volumes.items():
        value = re.sub(rf"(?<![\w/]){re.escape(container)}(?=/|\s|\"|$)", str(host), value)
    return value


def run_env(volumes: dict[str, Path], *envs: dict) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra in envs:
        env.update({k: remap(str(v), volumes) for k, v in (extra or {}).items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compose_wires_indexer_api_and_trainer():
    config = compose_config("docker-compose.yml")
    services = config["services"]
    api, indexer, trainer = services["api"], services["indexer"], services["trainer"]
    assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert trainer["profiles"] == ["train"] and "profiles" not in api and "profiles" not in indexer
    assert set(config["volumes"]) >= {"models", "indexes"}
    mounts = {name: {v.split(":")[0]: v.split(":")[1] for v in s["volumes"]} for name, s in services.items()}
    assert mounts["indexer"]["models"] == mounts["api"]["models"] == mounts["trainer"]["models"] == "/models"
    assert mounts["indexer"]["indexes"] == mounts["api"]["indexes"] == "/indexes"
    assert "/models:ro" in " ".join(api["volumes"])  # the API never writes the model
    # trainer writes where the indexer and API read
    _, train_env, train_cmd = dockerfile("trainer")
    assert "/models/current" in train_cmd[-1] and api["environment"]["AVSEARCH_MODEL_DIR"] == "/models/current"
    assert all(s["build"]["context"] == str(REPO) for s in services.values())


def test_gpu_override_reserves_a_gpu_and_runs_the_cuda_image():
    services = compose_config("docker-compose.yml", "docker/compose.gpu.yml")["services"]
    for name in ("api", "indexer"):
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and service["image"] == "avsearch:gpu"
        build = service["build"]  # the CPU image's Dockerfile and stages, on a CUDA base
        assert {k: build[k] for k in ("context", "dockerfile", "target")} == {"context": str(REPO), "dockerfile": "docker/Dockerfile", "target": "api"}
        assert build["args"]["BASE_IMAGE"].startswith("nvidia/cuda:") and build["args"]["EXTRA"] == "gpu"
        assert service["environment"]["AVSEARCH_DEVICE"] == "cuda"
        _, gpu_env, _ = dockerfile("api", build["args"])
        assert gpu_env["AVSEARCH_DEVICE"] == "cuda"
    assert services["api"]["depends_on"]["indexer"]["condition"] == "service_completed_successfully"


def run_lines(text: str) -> str:
    return "\n".join(line for line in text.replace("\\\n", " ").splitlines() if line.startswith("RUN "))


def test_images_install_torch_only_in_the_trainer():
    """Static: the API stages install the cpu/gpu extra and copy no training/; the built images are
    checked for torch and training/ by tests/docker (make docker-test)."""
    api, api_env, _ = dockerfile("api")
    train, _, _ = dockerfile("trainer")
    # each runtime stage takes its venv from its own build stage, and copies only the packages it runs
    assert "COPY --from=api-build /opt/venv /opt/venv" in api and "COPY --from=trainer-build /opt/venv /opt/venv" in train
    assert re.findall(r"^COPY (\w+) ", api, re.MULTILINE) == ["avdata", "index", "store", "service"]
    assert re.findall(r"^COPY (\w+) ", train, re.MULTILINE) == ["avdata", "training"]
    api_runs, train_runs = run_lines(dockerfile("api-build")[0]), run_lines(dockerfile("trainer-build")[0])
    assert 'requirements-of "${EXTRA}"' in api_runs and "train" not in api_runs and "torch" not in api_runs
    assert "requirements-of cpu train" in train_runs
    assert '--index-url "${TORCH_INDEX}"' in train_runs  # torch from the CPU index, a build argument
    assert api_env["AVSEARCH_MODEL_DIR"] == "/models/current" and api_env["AVSEARCH_DEVICE"] == "auto"
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*" and "!training/" in rules and not any(r.startswith(("!tests", "!data", "!.venv")) for r in rules)  # an allowlist


def test_indexer_command_builds_once_then_keeps_the_index(volumes):
    indexer = compose_config("docker-compose.yml")["services"]["indexer"]
    _, image_env, _ = dockerfile("api")
    command = [sys.executable if a == "python" else remap(a, volumes) for a in indexer["command"]]
    env = run_env(volumes, image_env, indexer["environment"])
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "built audio: 600 items, visual: 600 items" in first.stdout
    link = volumes["/indexes"] / "current"
    first_version = link.resolve()
    assert link.is_symlink() and first_version.name.startswith("current-")
    stamp = (link / "audio" / "info.json").stat().st_mtime_ns
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (link / "audio" / "info.json").stat().st_mtime_ns == stamp  # API changes survive
    # a new model: built beside the live version (which a running API keeps saving into), then the link flips
    manifest = volumes["/models"] / "current" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"schema_version"', '"note": "v2", "schema_version"', 1))
    new = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert new.returncode == 0, new.stderr
    assert link.resolve() != first_version and (first_version / "audio" / "info.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in volumes["/indexes"].iterdir()) == sorted(["current", first_version.name, link.resolve().name])
    shutil.rmtree(volumes["/models"] / "current")
    missing = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1 and "--profile train run --rm trainer" in lines[0]


def test_api_command_serves_answers_sighup_and_stops(volumes, tiny):
    subprocess.run([sys.executable, "-m", "index", "build", "--model", str(volumes["/models"] / "current"), "--data", str(tiny.data_dir), "--out", str(volumes["/indexes"] / "current")], cwd=REPO, check=True, capture_output=True, timeout=120)
    api = compose_config("docker-compose.yml")["services"]["api"]
    _, image_env, image_cmd = dockerfile("api")
    assert api["command"] == image_cmd  # compose runs the image's command
    port = free_port()
    command = [sys.executable if a == "python" else ("127.0.0.1" if a == "0.0.0.0" else str(port) if a == "8000" else a) for a in api["command"]]
    env = run_env(volumes, image_env, api["environment"])
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = [sys.executable if a == "python" else a.replace(":8000", f":{port}") for a in api["healthcheck"]["test"][1:]]
        deadline = time.monotonic() + 60
        while subprocess.run(health, capture_output=True).returncode != 0:  # the compose health check itself
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        base = f"http://127.0.0.1:{port}"
        features = json.loads(subprocess.run([sys.executable, "-m", "service", "example", "--data", str(tiny.data_dir), "--out", "/dev/stdout"], cwd=REPO, capture_output=True, text=True).stdout)
        r = httpx.post(f"{base}/v1/search", json=features)
        assert r.status_code == 200 and len(r.json()["results"][0]) == 10
        proc.send_signal(signal.SIGHUP)  # swap in what the configured paths hold now
        deadline = time.monotonic() + 30
        while "avsearch_version_swaps_total 1.0" not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.post(f"{base}/v1/search", json=features).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # a clean shutdown; uvicorn re-raises SIGTERM after it, as Docker expects of a stopped container
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out


def test_a_missing_docker_compose_fails_with_a_clear_message(monkeypatch):
    """Not a skip: the compose and SIGHUP tests once skipped quietly when docker-compose was missing."""
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        compose_config("docker-compose.yml")
    except BaseException as outcome:  # pytest's skip and fail outcomes are BaseExceptions: tell them apart here
        assert type(outcome) is pytest.fail.Exception and str(outcome) == NO_COMPOSE, repr(outcome)
    else:
        raise AssertionError("compose_config ran without docker-compose")


def test_make_test_fails_when_docker_compose_cannot_be_installed():
    """The install recipe once ended in `|| echo warning`: the run went on without docker-compose."""
    makefile = (REPO / "Makefile").read_text()
    line = next(line for line in makefile.splitlines() if "apt-get install" in line and "docker-compose" in line)
    script = line.strip().replace("apt-get", "false")  # command -v finds nothing (PATH below) and the install fails
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, env={"PATH": "/nonexistent"})
    assert out.returncode != 0 and "could not install docker-compose" in out.stderr, (out.returncode, out.stdout, out.stderr)


def test_trainer_command_writes_the_model_the_indexer_reads(volumes, tmp_path):
    _, train_env, train_cmd = dockerfile("trainer")
    shutil.rmtree(volumes["/models"] / "current")
    command = [remap(a, volumes) for a in train_cmd]
    env = run_env(volumes, train_env, {"AVSEARCH_TRAIN_CONFIG": "tiny"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in the sh -c line is this venv's
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((volumes["/models"] / "current" / "manifest.json").read_text())
    assert manifest["input_dims"] == {"audio": 128, "visual": 1024}
