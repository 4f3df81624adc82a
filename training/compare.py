"""``compare``: HSC-MAE, the baselines, the ablations and the mask-ratio sweep, over seeds.

Every (method, seed) run is written to ``<out>/runs/<method>_seed<seed>.json`` as soon as it
finishes, with its configuration, the data's fingerprint and the training code's fingerprint; a
rerun reuses a stored run only when all three match (so runs of another preset, data set or code
never mix into one table), and an interrupted comparison resumes. Seeds
are taken in the outer loop, so a partial comparison already covers every method. Selection is on
validation; the test figures of the selected step are recorded once. The synthetic data (or the
given features) are the same for every seed; the seed changes initialisation, batch order and masks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from tqdm import tqdm

from training.baselines import METHODS, linear_cca_on_raw, method_config
from training.config import Config, config_to_dict
from training.data import PairedFeatures, atomic_write
from training.report import write_report
from training.train import evaluate_model, selection_signal, train

log = logging.getLogger(__name__)


def default_methods(cfg: Config) -> list[str]:
    """Every method; the sweep point equal to the preset's ρ reuses the full HSC-MAE runs."""
    return [m for m in METHODS if not (METHODS[m][0] == "sweep" and _is_default_rho(cfg, m))]


def _is_default_rho(cfg: Config, name: str) -> bool:
    return METHODS[name][0] == "sweep" and abs(METHODS[name][2]["mask_ratio"] - cfg.objective.mask_ratio) < 1e-12


# The modules whose code decides a run's numbers; data.py is covered by the data fingerprint.
RESULT_CODE = ("model.py", "losses.py", "hscmae.py", "train.py", "baselines.py", "cca.py", "metrics.py")


def data_fingerprint(data: PairedFeatures) -> str:
    """sha256 over the features, labels and split: the same numbers give the same fingerprint."""
    digest = hashlib.sha256()
    for array in (data.audio, data.visual, data.labels, data.split):
        if array is not None:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.astype("U5").tobytes() if array.dtype.kind in "OU" else array.tobytes())
    return digest.hexdigest()


def code_fingerprint() -> str:
    package = Path(__file__).parent
    return hashlib.sha256(b"".join((package / name).read_bytes() for name in RESULT_CODE)).hexdigest()


def run_key(cfg: Config, name: str, seed: int, data_digest: str) -> dict:
    """What a stored run must match to be reused: its full configuration, data and code."""
    run_cfg = method_config(cfg, name) if name != "linear-cca" else cfg
    key = {"config": {**config_to_dict(run_cfg), "seed": seed}, "data": data_digest, "code": code_fingerprint()}
    return json.loads(json.dumps(key))  # as it reads back from the stored run (tuples become lists)


def run_one(cfg: Config, data: PairedFeatures, name: str, seed: int) -> dict:
    """Train (or fit) one method with one seed; returns its record (no model).

    With labels, the run is also selected by the other signal (``also_select``): ``by_signal``
    holds the step, validation and test figures each rule picks from the same training run.
    """
    started = time.perf_counter()
    if name == "linear-cca":
        metrics = linear_cca_on_raw(data, cfg)
        record = {"val": metrics["val"], "test": metrics["test"], "best_step": None, "last_step": None, "history": []}
    else:
        run_cfg = method_config(cfg, name)
        run_cfg.train.seed = seed
        result = train(run_cfg, data, show_progress=False, also_select=("labels", "pairs") if data.labels is not None else ())
        test_split = data.subset("test")
        last = result.history[-1]["step"] if result.history else 0
        record = {"select": result.select, "best_step": result.best_step, "last_step": last, "max_steps": result.schedule.max_steps, "history": result.history}
        for selected in (result, *result.others.values()):
            figures = {"val": selected.val_metrics, "test": evaluate_model(selected.model, selected.cca, test_split), "best_step": selected.best_step}
            record.setdefault("by_signal", {})[selected.select] = figures
        record.update(val=record["by_signal"][result.select]["val"], test=record["by_signal"][result.select]["test"])
    record.update({"method": name, "seed": seed, "seconds": time.perf_counter() - started})
    return record


def _stored_run(path: Path, key: dict) -> dict | None:
    """The record at ``path`` when it was made with ``key``'s configuration, data and code."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != key:
        log.warning("%s: made with another configuration, data set or code; running it again", path)
        return None
    return record


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def compare(
    cfg: Config, data: PairedFeatures, n_seeds: int, out: Path, methods: list[str] | None = None, show_progress: bool = True,
    report_only: bool = False, method_configs: dict[str, Config] | None = None,
) -> dict:
    """Run ``methods`` (default: all) for ``n_seeds`` seeds, write the report to ``out``; returns it.

    ``report_only`` trains nothing: the report covers the stored runs that match. ``method_configs``
    gives a method its own configuration (a tuned preset) in place of ``cfg``.
    """
    out = Path(out)
    methods = methods or default_methods(cfg)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    seeds = [cfg.train.seed + i for i in range(n_seeds)]
    started = time.perf_counter()
    records, complete = [], True
    digest = data_fingerprint(data)
    jobs = [(seed, m) for seed in seeds for m in methods]
    bar = tqdm(jobs, desc="compare", unit="run", disable=not show_progress)
    for seed, name in bar:
        path = out / "runs" / f"{name}_seed{seed}.json"
        run_cfg = method_configs.get(name, cfg) if method_configs else cfg
        key = run_key(run_cfg, name, seed, digest)
        stored = _stored_run(path, key)
        if stored is not None:
            records.append(stored)
            continue
        if report_only:
            complete = False
            continue
        bar.set_postfix(method=name, seed=seed)
        record = {**run_one(run_cfg, data, name, seed), "key": key}
        _write_json(path, record)
        records.append(record)
        headline = "avg" if data.labels is not None else "pair_mrr"
        log.info("%s seed %d: test %s %.4f (val %.4f) in %.0f s", name, seed, headline, record["test"][headline], record["val"][headline], record["seconds"])
    if not records:
        raise ValueError(f"{out / 'runs'}: no finished run matches this configuration, data and code; run compare without --report-only")
    full_cfg = (method_configs or {}).get("hscmae", cfg)  # a tuned full model has its own ρ
    sweeping = any(METHODS[m][0] == "sweep" for m in methods)
    for name in METHODS:  # the sweep point at the full model's ρ is the full model's runs
        if sweeping and _is_default_rho(full_cfg, name) and name not in methods and "hscmae" in methods:
            records += [{**r, "method": name} for r in records if r["method"] == "hscmae"]
    meta = {
        "config": config_to_dict(cfg),
        "data_source": data.source,
        "labels": data.labels is not None,
        "select": selection_signal(cfg.train.select, data),
        "seeds": seeds,
        "data_fingerprint": digest,
        "complete": complete,
        "report_only": report_only,
        "wall_seconds_this_invocation": time.perf_counter() - started,
        "train_seconds_sum": sum(r["seconds"] for r in records if r["method"] in methods),
    }
    return write_report(out, records, meta)
