"""The loop, checkpoints, --resume, the CLI, compare/report, and the paper preset on HDF5 features."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from training.__main__ import main
from training.config import load_config
from training.synthetic import generate
from training.train import CHECKPOINT_NAME, evaluate_model, load_checkpoint, save_checkpoint, train


@pytest.fixture(scope="module")
def tiny_data():
    return generate(load_config("tiny").synthetic)


def test_the_evaluated_model_is_the_ema_teacher(tiny_data, tmp_path):
    cfg = load_config("tiny")
    cfg.train.max_steps = cfg.train.eval_every  # one evaluation, so the selected teacher is the final state
    result = train(cfg, tiny_data, show_progress=False, state_path=tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    got = result.model.state_dict()
    for name, value in state["teacher"].items():
        torch.testing.assert_close(got[name], value.cpu())
    assert any(not torch.allclose(got[n], v.cpu()) for n, v in state["student"].items() if v.is_floating_point())
    save_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, cfg, tiny_data, result)
    cfg2, model, cca, payload, digest = load_checkpoint(tmp_path / "run")
    assert cfg2.objective == cfg.objective and payload["audio_dim"] == 128 and len(digest) == 64
    x = torch.from_numpy(tiny_data.audio[:5])
    torch.testing.assert_close(model.towers["audio"](x), result.model.towers["audio"](x))
    assert cca is not None and cca.proj_a.shape == (cfg.model.out_dim, cfg.cca.n_components)


def test_resume_reproduces_an_uninterrupted_run(tiny_data, tmp_path):
    cfg = load_config("tiny")
    whole = train(cfg, tiny_data, show_progress=False)
    train(cfg, tiny_data, show_progress=False, state_path=tmp_path / "s.pt", stop_after=1)
    state = torch.load(tmp_path / "s.pt", weights_only=False)
    assert len(state["history"]) == 1 and set(state["rng"]) == {"cpu", "cuda"}
    resumed = train(cfg, tiny_data, show_progress=False, state_path=tmp_path / "s.pt", resume=True)
    assert [h["step"] for h in resumed.history] == [8, 16, 24]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-5)
    assert resumed.val_metrics["avg"] == pytest.approx(whole.val_metrics["avg"], rel=1e-5)
    cfg.train.seed += 1
    with pytest.raises(ValueError, match="different configuration"):
        train(cfg, tiny_data, show_progress=False, state_path=tmp_path / "s.pt", resume=True)


def test_cli_train_eval_and_errors(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--data", "synthetic", "--out", str(run), "--method", "clip", "--seed", "3", "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"val", "test", "best_step", "last_step", "schedule", "selected_by"}
    assert metrics["selected_by"] == {"rule": "auto", "signal": "pairs", "metric": "pair_mrr_no_cca"}
    cfg, model, cca, *_ = load_checkpoint(run)
    assert cfg.train.method == "clip" and cfg.train.seed == 3 and cfg.objective.paired_nce and not cfg.objective.teacher
    # The recorded figures are those of the saved model, recomputed here from the checkpoint.
    data = generate(cfg.synthetic)
    assert metrics["test"]["avg"] == pytest.approx(evaluate_model(model, cca, data.subset("test"))["avg"], abs=1e-6)
    assert metrics["val"]["avg"] == pytest.approx(evaluate_model(model, cca, data.subset("val"))["avg"], abs=1e-6)
    assert metrics["best_step"] in {8, 16, 24} and metrics["schedule"]["max_steps"] == 24
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--data", "synthetic"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"a2v", "v2a", "avg", "pair_mrr", "pair_mrr_no_cca", "pair_r@1", "pair_r@10", "pair_median_rank"}
    assert last["avg"] == pytest.approx(metrics["test"]["avg"]) and last["pair_mrr"] == pytest.approx(metrics["test"]["pair_mrr"])
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "x"), "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "x"), "--method", "linear-cca"]) == 2


def test_compare_writes_the_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["compare", "--config", "tiny", "--data", "synthetic", "--seeds", "2", "--out", str(out), "--methods", "hscmae,linear-cca,clip,rho=0", "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"hscmae", "linear-cca", "clip", "rho=0", "rho=0.3"} <= set(results["methods"])
    full = results["methods"]["hscmae"]
    assert full["n"] == 2 and len(full["runs"]) == 2
    values = [r["test"]["avg"] for r in full["runs"]]
    assert full["mean"]["avg"] == pytest.approx(np.mean(values)) and full["std"]["avg"] == pytest.approx(np.std(values, ddof=1))
    table = (out / "results.md").read_text()
    assert "| A→V | V→A | avg |" in table and "`linear-cca`" in table and "pairs MRR" in table
    # With labels every trained run is selected both ways; the report tables what pairs cost.
    run = full["runs"][0]
    assert run["select"] == "pairs" and set(run["by_signal"]) == {"pairs", "labels"} and run["test"] == run["by_signal"]["pairs"]["test"]
    assert run["by_signal"]["labels"]["val"]["avg"] >= run["by_signal"]["pairs"]["val"]["avg"] - 1e-9  # what the labels rule maximises (val fits in one sample here)
    cost = full["selection_cost"]
    by_labels = [r["by_signal"]["labels"]["test"]["avg"] for r in full["runs"]]
    assert cost["n"] == 2 and cost["labels"]["mean"] == pytest.approx(np.mean(by_labels))
    assert cost["diff"]["mean"] == pytest.approx(np.mean(values) - np.mean(by_labels))
    assert "What selecting without labels costs" in table and "`linear-cca` |" not in table.split("What selecting")[1]
    for png in results["plots"].values():
        assert (out / png).stat().st_size > 5000, png
    stamp = (out / "runs" / "hscmae_seed42.json").stat().st_mtime_ns
    assert main(args) == 0  # the second invocation reuses every finished run
    assert (out / "runs" / "hscmae_seed42.json").stat().st_mtime_ns == stamp


def test_paper_preset_trains_on_the_authors_hdf5_layout(tmp_path):
    data = generate(load_config("tiny").synthetic)
    train_rows, test_rows = np.flatnonzero(data.split != "test")[:200], np.flatnonzero(data.split == "test")[:60]
    path = tmp_path / "AVE_like.h5"
    with h5py.File(path, "w") as f:
        for name, rows in (("train", train_rows), ("test", test_rows)):
            f[f"audio_{name}"], f[f"visual_{name}"], f[f"lab_{name}"] = data.audio[rows], data.visual[rows], data.labels[rows]
    config = tmp_path / "paper_short.yaml"  # the paper preset, a few steps so the test takes seconds
    config.write_text((load_config.__globals__["PRESET_DIR"] / "paper.yaml").read_text() + "\n")
    cfg = load_config(str(config))
    cfg.train.max_steps, cfg.train.eval_every, cfg.objective.warmup_steps = 4, 2, 2
    from training.data import load_features

    features = load_features(path)
    result = train(cfg, features, show_progress=False)
    assert result.model.towers["visual"].encoder.net[1].out_features == 1024 and result.cca.proj_a.shape == (32, 10)
    # The reported validation figure is the selected model's, recomputed here on the carved split.
    val = evaluate_model(result.model, result.cca, features.labelled().subset("val"))
    assert result.val_metrics["avg"] == pytest.approx(val["avg"], abs=1e-6)
    assert (features.split == "val").sum() > 0 and (features.split[-60:] == "test").all()
