#!/usr/bin/env bash
# `make docker-test`: build the images and run the compose flow for real, then leave nothing behind.
#
#   1. a Docker engine: the running one, else dockerd started here (and stopped on exit);
#   2. base images: BASE_IMAGE if given, else python:3.11-slim (present or pulled), else made
#      locally from Debian packages by docker/make-base-images.sh (no registry reachable);
#   3. the CPU torch for the trainer: TORCH_INDEX if given, else a local torch wheel served to the
#      build on the host's loopback, else the public CPU index;
#   4. builds avsearch:cpu and avsearch:train, and the GPU image's stages on a base without Python;
#   5. pytest tests/docker: the images' contents, then trainer (tiny preset) -> indexer -> API
#      healthy -> search -> upsert -> `restart api` -> the upsert is still there; `down -v` after;
#   6. checks that no container, network or volume of the test's compose project is left.
# Prints the time of each step. Settings: BASE_IMAGE, PLAIN_BASE_IMAGE, TORCH_INDEX, TORCH_WHEEL_DIR,
# PYTHON (the venv with pytest; default .venv/bin/python), KEEP_IMAGES=0 removes the built images.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
PROJECT=avsearch-docker-test-$$
work=$(mktemp -d /tmp/avsearch-docker-test.XXXXXX)
started_dockerd= index_server= compose=()
declare -a timings=()

log() { printf '[docker-test %s] %s\n' "$(date +%T)" "$*"; }
die() { printf '[docker-test] error: %s\n' "$*" >&2; exit 1; }
clock() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(clock)" 'BEGIN {printf "%.1f", b - a}'; }
step() { timings+=("$(printf '%-60s %7s s' "$1" "$2")"); log "$1: $2 s"; }

cleanup() {
    local rc=$?
    set +e
    if ((${#compose[@]})) && docker info >/dev/null 2>&1; then
        # The tests tear down themselves; this is the net for an interrupted run.
        "${compose[@]}" -p "$PROJECT" --profile train down -v --remove-orphans >/dev/null 2>&1
    fi
    [[ -n $index_server ]] && kill "$index_server" 2>/dev/null && wait "$index_server" 2>/dev/null
    if [[ -n $started_dockerd ]]; then
        log "stopping the dockerd started here (pid $started_dockerd)"
        kill "$started_dockerd" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t_all=$(clock)
[[ -x $PY ]] || die "$PY is missing: run make install-test first (or set PYTHON)"

# --- 1. engine ---------------------------------------------------------------------------------------
t=$(clock)
if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null; then
        log "no dockerd: apt-get install -y docker.io"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; } \
            || die "could not install docker.io (apt-get failed); start a Docker engine and re-run"
    fi
    [[ $(id -u) == 0 ]] || die "no Docker engine runs and starting dockerd needs root"
    log "no Docker engine answers: starting dockerd (log: $work/dockerd.log)"
    dockerd --pidfile "$work/dockerd.pid" >"$work/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -n 20 "$work/dockerd.log" >&2; die "dockerd did not come up (log above)"; }
fi
step "engine ready${started_dockerd:+ (dockerd started here)}" "$(took "$t")"

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    die "neither 'docker compose' nor docker-compose is installed: apt-get install docker-compose"
fi
log "compose: ${compose[*]} ($("${compose[@]}" version --short 2>/dev/null || echo '?'))"

# --- 2. base images -----------------------------------------------------------------------------------
t=$(clock)
if [[ -z ${BASE_IMAGE:-} ]]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=python:3.11-slim
        PLAIN_BASE_IMAGE=${PLAIN_BASE_IMAGE:-debian:bookworm-slim}
        docker image inspect "$PLAIN_BASE_IMAGE" >/dev/null 2>&1 || timeout 60 docker pull -q "$PLAIN_BASE_IMAGE" >/dev/null \
            || die "could not pull $PLAIN_BASE_IMAGE (set PLAIN_BASE_IMAGE)"
    else
        log "no registry reachable: making the base images from Debian packages (docker/make-base-images.sh)"
        docker/make-base-images.sh
        BASE_IMAGE=avsearch-base/python:3.11-bookworm
        PLAIN_BASE_IMAGE=${PLAIN_BASE_IMAGE:-avsearch-base/debian:bookworm}
    fi
fi
PLAIN_BASE_IMAGE=${PLAIN_BASE_IMAGE:-avsearch-base/debian:bookworm}
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "base image $BASE_IMAGE is missing"
step "base images ($BASE_IMAGE)" "$(took "$t")"

# --- 3. where the trainer's CPU torch comes from --------------------------------------------------------
torch_version=$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)
[[ -n $torch_version ]] || die "found no torch==<version> pin in pyproject.toml"
if [[ -z ${TORCH_INDEX:-} ]]; then
    wheel=
    for dir in ${TORCH_WHEEL_DIR:-} $("$PY" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") /opt/wheels; do
        found=$(ls "$dir"/torch-"$torch_version"+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)
        [[ -n $found ]] && { wheel=$found; break; }
    done
    if [[ -n $wheel ]]; then
        # A one-project index (<root>/torch/<wheel>) on the host's loopback; the builds use the host's
        # network, so pip inside reaches it as it would reach download.pytorch.org.
        mkdir -p "$work/torch-index/torch" && ln -s "$(realpath "$wheel")" "$work/torch-index/torch/"
        # A fixed port: TORCH_INDEX is a build argument, so its URL is part of the build cache key (a
        # random port would rebuild the trainer's venv every run); a free one only when it is taken.
        port=${TORCH_INDEX_PORT:-38471}
        if ! "$PY" -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; then
            port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
            log "port ${TORCH_INDEX_PORT:-38471} is taken: the local torch index on $port (the trainer's venv is rebuilt)"
        fi
        "$PY" -m http.server --bind 127.0.0.1 --directory "$work/torch-index" "$port" >"$work/torch-index.log" 2>&1 &
        index_server=$!
        TORCH_INDEX=http://127.0.0.1:$port/
        for _ in $(seq 50); do curl -fsS "$TORCH_INDEX/torch/" >/dev/null 2>&1 && break; sleep 0.1; done
        curl -fsS "$TORCH_INDEX/torch/" >/dev/null || die "the local torch index at $TORCH_INDEX does not answer"
        log "torch $torch_version from the local wheel $wheel"
    else
        TORCH_INDEX=https://download.pytorch.org/whl/cpu
    fi
fi

# --- 4. images --------------------------------------------------------------------------------------------
build() {  # build <tag> <target> [--build-arg ...]: the host network reaches PyPI and the local torch index
    local tag=$1 target=$2; shift 2
    # --force-rm: a failed step leaves no container behind either
    docker build --network host --force-rm -q -f docker/Dockerfile --target "$target" -t "$tag" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        "$@" . >"$work/build-$target.log" 2>&1 || { tail -n 40 "$work/build-$target.log" >&2; die "docker build --target $target failed (log above)"; }
}
# The build stages are tagged too (avsearch-build:*): the classic builder's cache for them lives in
# their images, which the prune below would otherwise take as dangling.
t=$(clock)
build avsearch-build:api api-build && build avsearch:cpu api
step "build avsearch:cpu (API)" "$(took "$t")"
t=$(clock)
build avsearch-build:trainer trainer-build --build-arg TORCH_INDEX="$TORCH_INDEX" && build avsearch:train trainer --build-arg TORCH_INDEX="$TORCH_INDEX"
step "build avsearch:train (trainer)" "$(took "$t")"
# The GPU image is the same stages on a CUDA base, which has no Python and cannot be pulled here: the
# base and build stages (Python installed with apt, the user, the venv) are built on a stand-in
# without Python, with the PYTHON that docker/compose.gpu.yml passes, and pip resolves the gpu extra
# there (--dry-run: onnxruntime-gpu and faiss-gpu-cu12 with their CUDA wheels are GBs, and no GPU).
t=$(clock)
gpu_python=$(sed -n 's/.*PYTHON: \([a-z0-9.]*\).*/\1/p' docker/compose.gpu.yml)
[[ -n $gpu_python ]] || die "found no PYTHON build argument in docker/compose.gpu.yml"
build avsearch-build:gpu-check build --build-arg BASE_IMAGE="$PLAIN_BASE_IMAGE" --build-arg PYTHON="$gpu_python"
docker run --rm --network host avsearch-build:gpu-check sh -c "id avsearch && /opt/venv/bin/python --version \
    && /opt/venv/bin/python /usr/local/bin/requirements-of gpu >/tmp/requirements.txt \
    && /opt/venv/bin/python -m pip install --disable-pip-version-check --dry-run --quiet --report /tmp/report.json -r /tmp/requirements.txt \
    && /opt/venv/bin/python -c 'import json; names = {i[\"metadata\"][\"name\"].lower() for i in json.load(open(\"/tmp/report.json\"))[\"install\"]}; \
missing = {\"onnxruntime-gpu\", \"faiss-gpu-cu12\"} - names; assert not missing, missing; print(\"gpu extra resolves:\", len(names), \"packages\")'" \
    >"$work/gpu-check.log" 2>&1 || { tail -n 20 "$work/gpu-check.log" >&2; die "the GPU image's stages fail on a base without Python (log above)"; }
log "GPU stages: $(tr '\n' ' ' <"$work/gpu-check.log")"
step "GPU stages: base + build on $PLAIN_BASE_IMAGE, gpu extra resolved" "$(took "$t")"
docker image prune -f --filter label=org.opencontainers.image.vendor=avsearch >/dev/null  # earlier builds' images, now untagged
log "image sizes: $(docker image inspect -f '{{index .RepoTags 0}} {{.Size}}' avsearch:cpu avsearch:train | awk '{printf "%s %.0f MB  ", $1, $2/1e6}')"

# --- 5. the compose flow, in pytest ------------------------------------------------------------------------
"$PY" -m training make-data --config tiny --out "$work/data" >/dev/null
chmod 0755 "$work"  # mktemp's 0700 would keep the containers' user out of the bind-mounted data
t=$(clock)
AVSEARCH_DOCKER_TEST=1 AVSEARCH_DOCKER_COMPOSE="${compose[*]}" AVSEARCH_DOCKER_PROJECT=$PROJECT \
    AVSEARCH_DOCKER_DATA=$work/data AVSEARCH_DOCKER_TIMINGS=$work/timings.txt \
    "$PY" -m pytest -q -p no:cacheprovider tests/docker
step "pytest tests/docker (images + compose flow)" "$(took "$t")"

# --- 6. nothing of ours left (every container, the trainer's `run --rm` ones included, carries the label) ------
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT"; docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
[[ -z $left ]] || die "left behind by project $PROJECT: $left"
if [[ ${KEEP_IMAGES:-1} == 0 ]]; then docker image rm avsearch:cpu avsearch:train >/dev/null; fi

echo
echo "docker-test timings (compose: ${compose[*]}, base: $BASE_IMAGE)"
printf '  %s\n' "${timings[@]}"
[[ -f $work/timings.txt ]] && sed 's/^/  compose flow: /' "$work/timings.txt"
printf '  %-60s %7s s\n' "total" "$(took "$t_all")"
