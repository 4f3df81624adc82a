"""The recipe that follows the data: step budgets, early stopping, keyed reuse in compare, tuning."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from training.__main__ import main
from training.compare import compare
from training.config import TrainConfig, load_config
from training.synthetic import generate
from training.metrics import SELECTION_METRICS
from training.train import BatchStream, _restore_rng_states, plan_schedule, train


@pytest.fixture(scope="module")
def tiny_data():
    return generate(load_config("tiny").synthetic)


@pytest.mark.parametrize("n_train", [600, 1_200, 60_000, 600_000])
def test_the_schedule_follows_the_training_split(n_train):
    cfg = TrainConfig(batch_size=256, max_steps=3000, patience=800)
    s = plan_schedule(cfg, warmup_steps=200, n_train=n_train)
    assert s.batch_size == min(256, n_train // 8) and s.steps_per_epoch == n_train // s.batch_size >= 8
    assert s.eval_every == min(max(s.steps_per_epoch, 25), 100) and s.max_steps == 3000 and s.min_steps == 200
    assert s.max_epochs == pytest.approx(3000 / s.steps_per_epoch)


def test_batches_cover_every_row_once_an_epoch_and_resume_exactly():
    stream = BatchStream(10, 3, torch.Generator().manual_seed(0))
    first_epoch = torch.cat(stream.take(3))  # 3 batches of 3; the ragged row is dropped
    assert len(set(first_epoch.tolist())) == 9
    saved, generator_state = stream.state_dict(), stream.generator.get_state()
    ahead = stream.take(4)
    again = BatchStream(10, 3, torch.Generator())
    again.generator.set_state(generator_state)
    again.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(again.take(4), ahead))


def _scripted_validation(monkeypatch, scores, pair_scores=None):
    """Validation answers ``scores`` in turn (then keeps the last), so the stopping rule is what is tested.

    Class-level mAP (``avg``) follows ``scores``; the pairs signal follows ``pair_scores``
    (default: the same). The final evaluation of the selected model is not scripted.
    """
    import training.train as loop

    answers = iter(zip(scores, pair_scores or scores))
    last = {"avg": scores[-1], "pair": (pair_scores or scores)[-1]}

    def fake(model, cca, data, max_queries=0):
        last["avg"], last["pair"] = next(answers, (last["avg"], last["pair"]))
        return {"avg": last["avg"], "a2v": last["avg"], "v2a": last["avg"], SELECTION_METRICS["pairs"]: last["pair"]}

    monkeypatch.setattr(loop, "evaluate_model", fake)


def test_training_stops_when_validation_stops_improving(tiny_data, monkeypatch):
    _scripted_validation(monkeypatch, [0.50, 0.60, 0.55, 0.60, 0.59, 0.58, 0.70])
    cfg = load_config("tiny")
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.patience, cfg.objective.warmup_steps = 400, 10, 30, 0
    seen = []
    result = train(cfg, tiny_data, show_progress=False, on_evaluation=lambda step, val: seen.append((step, val)))
    # Best at step 20; a tie (0.60 at 40) is no improvement; 30 steps later the run ends, before 0.70.
    assert [h["step"] for h in result.history] == [10, 20, 30, 40, 50]
    assert result.best_step == 20 and seen == [(h["step"], h["val_avg"]) for h in result.history]


def test_each_signal_selects_in_a_shared_run_what_it_selects_alone(tiny_data, monkeypatch):
    labels = [0.50, 0.60, 0.55, 0.60, 0.59, 0.58, 0.70, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77]
    pairs = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.65, 0.64, 0.63, 0.90, 0.91, 0.92, 0.93]
    cfg = load_config("tiny")
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.patience, cfg.objective.warmup_steps = 400, 10, 30, 0
    alone = {}
    for rule in ("labels", "pairs"):
        _scripted_validation(monkeypatch, labels, pairs)
        cfg.train.select = rule
        result = train(cfg, tiny_data, show_progress=False)
        alone[rule] = (result.best_step, result.history[-1]["step"])
    # Labels stop at 50 (best 20); pairs climb to 70, then stop at 100 before their late rise.
    assert alone == {"labels": (20, 50), "pairs": (70, 100)}
    _scripted_validation(monkeypatch, labels, pairs)
    cfg.train.select = "labels"
    shared = train(cfg, tiny_data, show_progress=False, also_select=("pairs",))
    assert shared.select == "labels" and shared.best_step == 20 and set(shared.others) == {"pairs"}
    assert shared.others["pairs"].best_step == 70 and shared.history[-1]["step"] == 100  # runs until both stopped


def test_creeping_gains_below_min_delta_do_not_extend_the_run(tiny_data, monkeypatch):
    _scripted_validation(monkeypatch, [0.50, 0.600, 0.601, 0.602, 0.603, 0.604, 0.605, 0.606])
    cfg = load_config("tiny")
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.patience, cfg.objective.warmup_steps = 400, 10, 30, 0
    cfg.train.min_delta = 0.005
    result = train(cfg, tiny_data, show_progress=False)
    # Progress last at 20 (0.600); 0.601..0.603 creep below min_delta, so the run ends at 50, and
    # selection still takes the best score seen (0.603 at 50).
    assert [h["step"] for h in result.history] == [10, 20, 30, 40, 50] and result.best_step == 50


def test_early_stopping_waits_for_the_warm_up(tiny_data, monkeypatch):
    _scripted_validation(monkeypatch, [0.9, 0.1])
    cfg = load_config("tiny")
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.patience, cfg.objective.warmup_steps = 400, 10, 10, 60
    assert train(cfg, tiny_data, show_progress=False).history[-1]["step"] == 60
    cfg.train.patience = 0  # no early stopping: the whole budget
    _scripted_validation(monkeypatch, [0.9, 0.1])
    assert train(cfg, tiny_data, show_progress=False).history[-1]["step"] == 400


def test_cuda_random_states_are_restored_only_onto_matching_devices():
    cpu = torch.get_rng_state()
    _restore_rng_states(cpu)  # a state written before CUDA generators were saved still restores
    with pytest.raises(ValueError, match="CUDA random states"):
        _restore_rng_states({"cpu": cpu, "cuda": [torch.zeros(16, dtype=torch.uint8)] * (torch.cuda.device_count() + 1)})


@pytest.mark.gpu
def test_resume_on_cuda_reproduces_dropout(tiny_data, tmp_path):
    cfg = load_config("tiny")
    cfg.train.device = "cuda"
    whole = train(cfg, tiny_data, show_progress=False)
    train(cfg, tiny_data, show_progress=False, state_path=tmp_path / "s.pt", stop_after=1)
    resumed = train(cfg, tiny_data, show_progress=False, state_path=tmp_path / "s.pt", resume=True)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-5)


def test_compare_reuses_a_run_only_for_the_same_configuration_and_data(tiny_data, tmp_path):
    cfg = load_config("tiny")
    out = tmp_path / "report"
    compare(cfg, tiny_data, 1, out, methods=["clip"], show_progress=False)
    path = out / "runs" / "clip_seed42.json"
    stamp = path.stat().st_mtime_ns
    compare(cfg, tiny_data, 1, out, methods=["clip"], show_progress=False)
    assert path.stat().st_mtime_ns == stamp  # same configuration, data and code: reused
    other = load_config("tiny")
    other.objective.tau = 0.5
    compare(other, tiny_data, 1, out, methods=["clip"], show_progress=False)
    assert path.stat().st_mtime_ns != stamp and json.loads(path.read_text())["key"]["config"]["objective"]["tau"] == 0.5
    stamp = path.stat().st_mtime_ns
    shuffled = tiny_data.take(np.random.default_rng(0).permutation(len(tiny_data)))
    compare(other, replace(shuffled, ids=tiny_data.ids), 1, out, methods=["clip"], show_progress=False)
    assert path.stat().st_mtime_ns != stamp  # other data (here: rows paired with other splits)
    with pytest.raises(ValueError, match="no finished run matches"):
        compare(other, tiny_data, 1, out, methods=["clip"], show_progress=False, report_only=True)
    report = compare(other, replace(shuffled, ids=tiny_data.ids), 1, out, methods=["clip", "dcca"], show_progress=False, report_only=True)
    assert not report["meta"]["complete"] and set(report["methods"]) == {"clip"}


class _NoTestSplit:
    """Features whose test split cannot be read: tuning must select on validation only."""

    def __init__(self, data):
        self._data = data

    def subset(self, name):
        if name == "test":
            raise AssertionError("tuning read the test split")
        return self._data.subset(name)

    def __getattr__(self, name):
        return getattr(self._data, name)


def test_tune_selects_on_validation_resumes_and_writes_a_preset(tiny_data, tmp_path, capsys):
    from training.tune import load_tuned, tune

    cfg = load_config("tiny")
    guarded = _NoTestSplit(tiny_data)
    first = tune(cfg, guarded, "clip", 3, tmp_path / "study", show_progress=False)
    assert first.trials == 3 and 0 < first.val_score <= 1 and first.select == "pairs"
    summary = json.loads((tmp_path / "study" / "tuning.json").read_text())
    assert len(summary["trials"]) == 3 and max(t["value"] for t in summary["trials"] if t["state"] == "COMPLETE") == pytest.approx(first.val_score)
    cfg.train.select = "labels"  # a study scored by one signal is not continued by another
    with pytest.raises(ValueError, match="scored its trials by validation pairs"):
        tune(cfg, guarded, "clip", 4, tmp_path / "study", show_progress=False)
    cfg.train.select = "auto"
    tuned = load_tuned(tmp_path / "study")
    assert tuned.train.method == "clip" and tuned.objective.paired_nce and tuned.train.lr == summary["best_params"]["train.lr"]
    again = tune(cfg, guarded, "clip", 4, tmp_path / "study", show_progress=False)  # resumes: one more trial
    assert again.trials == 4 and len(json.loads((tmp_path / "study" / "tuning.json").read_text())["trials"]) == 4
    assert (tmp_path / "study" / "tuning_history.png").stat().st_size > 5000
    # The preset trains as written, with the method it names.
    assert main(["train", "--config", str(tmp_path / "study" / "best.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "study" / "best.yaml").read_text())
    assert saved["train"]["lr"] == json.loads((tmp_path / "study" / "tuning.json").read_text())["best_params"]["train.lr"]
    assert "method clip" in capsys.readouterr().out


def test_tune_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["tune", "--method", "linear-cca", "--trials", "2", "--config", "tiny", "--out", str(tmp_path)]) == 2
    assert "no search space" in capsys.readouterr().err
    assert main(["tune", "--method", "clip", "--trials", "0", "--config", "tiny", "--out", str(tmp_path)]) == 2


def test_the_mae_baseline_retrieves_with_h_not_an_untrained_head(tiny_data, tmp_path):
    from training.baselines import method_config
    from training.export import export_run
    from training.train import CHECKPOINT_NAME, save_checkpoint

    cfg = method_config(load_config("tiny"), "mae")
    assert not cfg.model.head and cfg.model.embedding_dim == cfg.model.hidden_dim
    result = train(cfg, tiny_data, show_progress=False)
    x = torch.from_numpy(tiny_data.audio[:4])
    with torch.no_grad():
        z, h = result.model.towers["audio"](x), result.model.towers["audio"].encode(x)
    torch.testing.assert_close(z, torch.nn.functional.normalize(h, dim=-1))  # no projection at all
    assert result.cca.proj_a.shape == (cfg.model.hidden_dim, cfg.cca.n_components)
    save_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, cfg, tiny_data, result)
    manifest = export_run(tmp_path / "run", tmp_path / "model", data=tiny_data)
    assert manifest["embedding_dim"] == cfg.cca.n_components


def test_compare_tune_with_a_shared_database_keeps_data_sets_apart(tmp_path, capsys):
    import optuna

    from training.compare import data_fingerprint

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ["compare", "--config", "tiny", "--data", "synthetic", "--seeds", "1", "--methods", "clip", "--tune", "2", "--storage", storage, "--quiet"]
    assert main(args + ["--out", str(tmp_path / "report")]) == 0
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert names == [f"clip-{data_fingerprint(generate(load_config('tiny').synthetic))[:12]}"]
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    tuned = yaml.safe_load((tmp_path / "report" / "tune" / "clip" / "best.yaml").read_text())
    run = results["methods"]["clip"]["runs"][0]
    assert run["key"]["config"]["train"]["lr"] == tuned["train"]["lr"]  # the seeds ran the tuned preset
