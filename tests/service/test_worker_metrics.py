"""/metrics over worker processes: every process's figures, added up from prometheus_client's files."""

from __future__ import annotations

import os
import subprocess
import sys

from service.metrics import Metrics

ANOTHER_PROCESS = """
from prometheus_client import CollectorRegistry, Counter
Counter("avsearch_version_swaps_total", "model/index versions swapped in", registry=CollectorRegistry()).inc(3)
"""


def test_a_process_file_not_yet_sized_is_read_as_empty_and_the_others_still_count(tmp_path, monkeypatch):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", ANOTHER_PROCESS], env=env, check=True)
    (tmp_path / "counter_4242.db").touch()  # a worker that has created its file and not yet sized it (or was killed then)
    (tmp_path / "histogram_4243.db").touch()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    text = Metrics(dict).render().decode()

    assert "avsearch_version_swaps_total 3.0" in text
