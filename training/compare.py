"""``compare``: HSC-MAE, the baselines, the ablations and the mask-ratio sweep, over seeds.

Every (method, seed) run is written to ``<out>/runs/<method>_seed<seed>.json`` as soon as it
finishes, and a rerun skips the runs already there, so an interrupted comparison resumes. Seeds
are taken in the outer loop, so a partial comparison already covers every method. Selection is on
validation; the test figures of the selected epoch are recorded once. The synthetic data (or the
given features) are the same for every seed; the seed changes initialisation, batch order and masks.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from training.baselines import METHODS, linear_cca_on_raw, method_config
from training.config import Config, config_to_dict
from training.data import PairedFeatures, atomic_write

log = logging.getLogger(__name__)


def default_methods(cfg: Config) -> list[str]:
    """Every method; the sweep point equal to the preset's ρ reuses the full HSC-MAE runs."""
    return [m for m in METHODS if not (METHODS[m][0] == "sweep" and _is_default_rho(cfg, m))]


def _is_default_rho(cfg: Config, name: str) -> bool:
    return METHODS[name][0] == "sweep" and abs(METHODS[name][2]["mask_ratio"] - cfg.objective.mask_ratio) < 1e-12


def run_one(cfg: Config, data: PairedFeatures, name: str, seed: int) -> dict:
    """Train (or fit) one method with one seed; returns its record (no model)."""
    from training.train import evaluate_model, train

    started = time.perf_counter()
    if name == "linear-cca":
        metrics = linear_cca_on_raw(data, cfg)
        record = {"val": metrics["val"], "test": metrics["test"], "best_epoch": None, "history": []}
    else:
        run_cfg = method_config(cfg, name)
        run_cfg.train.seed = seed
        result = train(run_cfg, data, show_progress=False)
        test = evaluate_model(result.model, result.cca, data.subset("test"))
        record = {"val": result.val_metrics, "test": test, "best_epoch": result.best_epoch, "history": result.history}
    record.update({"method": name, "seed": seed, "seconds": time.perf_counter() - started})
    return record


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def compare(
    cfg: Config, data: PairedFeatures, n_seeds: int, out: Path, methods: list[str] | None = None, show_progress: bool = True, report_only: bool = False
) -> dict:
    """Run ``methods`` (default: all) for ``n_seeds`` seeds, write the report to ``out``; returns it.

    ``report_only`` trains nothing: the report covers the runs already in ``out/runs``.
    """
    from training.report import write_report

    out = Path(out)
    methods = methods or default_methods(cfg)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    seeds = [cfg.train.seed + i for i in range(n_seeds)]
    started = time.perf_counter()
    records = []
    jobs = [(seed, m) for seed in seeds for m in methods]
    bar = tqdm(jobs, desc="compare", unit="run", disable=not show_progress)
    for seed, name in bar:
        path = out / "runs" / f"{name}_seed{seed}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
            continue
        if report_only:
            continue
        bar.set_postfix(method=name, seed=seed)
        record = run_one(cfg, data, name, seed)
        _write_json(path, record)
        records.append(record)
        log.info("%s seed %d: test avg %.4f (val %.4f) in %.0f s", name, seed, record["test"]["avg"], record["val"]["avg"], record["seconds"])
    for name in METHODS:  # the sweep point at the preset's ρ is the full model
        if _is_default_rho(cfg, name) and name not in methods and "hscmae" in methods:
            records += [{**r, "method": name} for r in records if r["method"] == "hscmae"]
    meta = {
        "config": config_to_dict(cfg),
        "data_source": data.source,
        "seeds": seeds,
        "complete": all((out / "runs" / f"{m}_seed{s}.json").is_file() for s in seeds for m in methods),
        "report_only": report_only,
        "wall_seconds_this_invocation": time.perf_counter() - started,
        "train_seconds_sum": sum(r["seconds"] for r in records if r["method"] in methods),
    }
    return write_report(out, records, meta)
