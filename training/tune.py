"""``tune``: an Optuna search over a method's declared space, scored on validation mAP only.

TPE proposes hyper-parameters from ``training.baselines.SEARCH_SPACES``; every validation
evaluation inside a trial is reported to a median pruner, which stops trials that trail the others
at the same step. The study lives in a database (SQLite in the output folder by default), so an
interrupted study resumes, and several processes or machines given the same ``--storage`` URL work
one study together. The test split is never read here. The best trial is written as a preset,
``best.yaml``, that ``python -m training train --config`` takes.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from training.baselines import method_config, search_space
from training.metrics import SELECTION_METRICS
from training.config import Config, config_from_dict, config_to_dict
from training.data import PairedFeatures, atomic_write
from training.train import selection_signal, train

log = logging.getLogger(__name__)
BEST_PRESET = "best.yaml"


@dataclass
class TuneResult:
    config: Config  # the best trial's full configuration (the method's switches applied)
    val_score: float  # its validation score under the selection signal
    select: str  # that signal: "pairs" (instance-level MRR) or "labels" (class-level avg mAP)
    trials: int  # finished trials in the study (complete, pruned or failed)
    seconds: float  # wall time of this invocation


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """A copy of ``cfg`` with ``{"section.field": value}`` set."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    return out


def suggest(trial, space: dict[str, tuple]) -> dict:
    values = {}
    for key, (kind, low, high) in space.items():
        if kind == "int":
            values[key] = trial.suggest_int(key, low, high)
        else:
            values[key] = trial.suggest_float(key, low, high, log=kind == "log")
    return values


def tune(
    cfg: Config, data: PairedFeatures, method: str, n_trials: int, out: Path, storage: str | None = None, study_name: str | None = None,
    show_progress: bool = True,
) -> TuneResult:
    """Run the study until it holds ``n_trials`` finished trials; write ``best.yaml`` and a summary."""
    import optuna

    if n_trials < 1:
        raise ValueError("--trials must be at least 1")
    base = method_config(cfg, method)
    signal = selection_signal(base.train.select, data)
    key = SELECTION_METRICS[signal]
    space = search_space(method)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    sampler = optuna.samplers.TPESampler(seed=cfg.train.seed, n_startup_trials=min(10, max(3, n_trials // 3)))
    # No pruning before the warm-up is over: every objective looks alike until its weights start to learn.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2 * base.objective.warmup_steps)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name or method, storage=storage, load_if_exists=True, direction="maximize", sampler=sampler, pruner=pruner)
    scored_by = study.user_attrs.get("select")
    if scored_by is None:
        study.set_user_attr("select", signal)
    elif scored_by != signal:
        raise ValueError(f"study {study.study_name!r} in {storage} scored its trials by validation {scored_by}, not {signal}; use another --out or --study, or --select {scored_by}")
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    started = time.perf_counter()

    def objective(trial) -> float:
        run_cfg = apply_overrides(base, suggest(trial, space))

        def report(step: int, score: float) -> None:
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation {key} {score:.4f} at step {step} is below the median")

        result = train(run_cfg, data, show_progress=False, on_evaluation=report)
        trial.set_user_attr("best_step", result.best_step)
        return result.val_metrics[key]

    remaining = n_trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:
        study.optimize(
            objective, n_trials=remaining, catch=(FloatingPointError,), show_progress_bar=show_progress,
            callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=finished)],  # other workers count too
        )
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {study.study_name!r}: no trial completed (all pruned or failed)")
    best = study.best_trial
    best_cfg = apply_overrides(base, best.params)
    trials = study.get_trials(deepcopy=False, states=finished)
    result = TuneResult(best_cfg, float(best.value), signal, len(trials), time.perf_counter() - started)
    _write_outputs(out, method, study, best, best_cfg, result, space)
    return result


def _write_outputs(out: Path, method: str, study, best, best_cfg: Config, result: TuneResult, space: dict) -> None:
    header = (
        f"# Tuned by `python -m training tune --method {method}`: trial {best.number} of {result.trials}, "
        f"validation {SELECTION_METRICS[result.select]} {result.val_score:.4f} (selected by {result.select} on validation only; test never read).\n"
        f"# Searched: {', '.join(space)}. Use: python -m training train --config {out / BEST_PRESET} --data DATA --out RUN\n"
    )
    atomic_write(out / BEST_PRESET, header + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False))
    rows = [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params, "last_step": t.last_step, "best_step": t.user_attrs.get("best_step")}
        for t in study.get_trials(deepcopy=False)
    ]
    summary = {"method": method, "study": study.study_name, "best_trial": best.number, "select": result.select, "best_val_score": result.val_score, "best_params": best.params, "trials": rows, "seconds_this_invocation": result.seconds}
    atomic_write(out / "tuning.json", json.dumps(summary, indent=1))
    _plot_history(out / "tuning_history.png", method, rows, SELECTION_METRICS[result.select])


def _plot_history(path: Path, method: str, rows: list[dict], score_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for state, style in (("COMPLETE", "o"), ("PRUNED", "x")):
        points = [(r["number"], r["value"]) for r in rows if r["state"] == state and r["value"] is not None]
        if points:
            ax.plot(*zip(*points), style, label=state.lower())
    done = [(r["number"], r["value"]) for r in rows if r["state"] == "COMPLETE"]
    if done:
        best, xs, ys = -1.0, [], []
        for number, value in sorted(done):
            best = max(best, value)
            xs.append(number)
            ys.append(best)
        ax.step(xs, ys, "k-", where="post", label="best so far")
    ax.set(xlabel="trial", ylabel=f"validation {score_name}", title=f"Tuning {method} (TPE + median pruning)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_tuned(out: Path) -> Config:
    """The best preset a finished study wrote into ``out``."""
    return config_from_dict(yaml.safe_load((Path(out) / BEST_PRESET).read_text()))
