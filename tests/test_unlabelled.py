"""A feature directory without labels.npy goes through every training command and `make run`.

The method needs no labels: the step is selected (and training stopped, and tuning trials scored) on
instance-level retrieval of each clip's own partner, and the reports say so.
"""

from __future__ import annotations

import json

import pytest

from avdata.features import save_directory
from avdata.synthetic import generate
from tests.test_make_run import make_run_and_search
from training.__main__ import main
from training.config import load_config


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    path = save_directory(generate(load_config("tiny").synthetic), tmp_path_factory.mktemp("unlabelled") / "clips")
    (path / "labels.npy").unlink()
    return path


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_training_command_runs_without_labels(unlabelled, tmp_path, capsys):
    data = str(unlabelled)
    assert main(["train", "--config", "tiny", "--data", data, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["selected_by"]["signal"] == "pairs" and "avg" not in metrics["test"] and 0 < metrics["test"]["pair_mrr"] <= 1
    assert "selected by validation pairs" in capsys.readouterr().out

    assert main(["eval", "--run", str(tmp_path / "run"), "--data", data]) == 0
    out = capsys.readouterr().out
    assert "no labels" in out and "instance-level" in out
    assert json.loads(out.strip().splitlines()[-1])["pair_mrr"] == pytest.approx(metrics["test"]["pair_mrr"])

    assert main(["tune", "--method", "clip", "--config", "tiny", "--data", data, "--trials", "2", "--out", str(tmp_path / "tune"), "--quiet"]) == 0
    tuning = json.loads((tmp_path / "tune" / "tuning.json").read_text())
    assert tuning["select"] == "pairs" and len(tuning["trials"]) == 2
    assert main(["train", "--config", str(tmp_path / "tune" / "best.yaml"), "--data", data, "--out", str(tmp_path / "tuned"), "--quiet"]) == 0

    report = tmp_path / "report"
    assert main(["compare", "--config", "tiny", "--data", data, "--seeds", "1", "--methods", "hscmae,linear-cca,clip", "--out", str(report), "--quiet"]) == 0
    text = (report / "results.md").read_text()
    assert "has no labels" in text and "What selecting without labels costs" not in text
    results = json.loads((report / "results.json").read_text())
    assert results["meta"]["select"] == "pairs" and set(results["methods"]) == {"hscmae", "linear-cca", "clip"}
    assert all("pair_mrr" in s["mean"] and "avg" not in s["mean"] for s in results["methods"].values())

    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    from index.__main__ import main as index_main

    assert index_main(["build", "--model", str(tmp_path / "model"), "--data", data, "--out", str(tmp_path / "index")]) == 0
    assert (tmp_path / "index" / "visual" / "info.json").is_file()


@pytest.mark.slow
def test_make_run_serves_an_unlabelled_directory(unlabelled, tmp_path):
    response = make_run_and_search(tmp_path, unlabelled)
    ids = set((unlabelled / "ids.txt").read_text().split())
    assert len(response["results"][0]) == 10 and all(hit["id"] in ids for hit in response["results"][0])
