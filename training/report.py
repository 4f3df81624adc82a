"""The comparison report: ``results.md``, ``results.json`` and PNG plots from per-run records.

A record is what :func:`training.compare.run_one` returns: method, seed, val/test metrics of the
selected step, per-evaluation history, seconds. Figures are fractions; ± is the sample standard
deviation over seeds (ddof = 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.baselines import METHODS
from training.data import atomic_write

CLASS_COLUMNS = ("a2v", "v2a", "avg", "avg_no_cca", "a2v_r@1", "a2v_r@5", "a2v_r@10", "v2a_r@1", "a2v_median_rank", "v2a_median_rank")
PAIR_COLUMNS = ("pair_mrr", "pair_mrr_no_cca", "pair_r@1", "pair_r@10", "pair_median_rank", "pair_a2v_r@1", "pair_v2a_r@1")
PLOTS = {
    "curves": "hscmae_training_curves.png",  # loss terms + validation mAP per evaluation (paper Fig. 2)
    "mask": "mask_ratio_sweep.png",  # mAP against ρ, gap between directions shaded (paper Fig. 3)
    "weights": "hscmae_task_weights.png",  # learned task weights over training
    "methods": "methods_avg_map.png",  # every method's average test mAP, mean ± std
}


def headline(records: list[dict]) -> str:
    """The figure methods are ranked by: class-level avg mAP with labels, instance-level MRR without."""
    return "avg" if all("avg" in r["test"] for r in records) else "pair_mrr"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(records: list[dict]) -> dict[str, dict]:
    """method -> {"mean": {col: ..}, "std": {col: ..}, "n": seeds} over the test figures."""
    out: dict[str, dict] = {}
    key = headline(records)
    columns = (CLASS_COLUMNS if key == "avg" else ()) + PAIR_COLUMNS
    for name in METHODS:
        runs = runs_of(records, name)
        if not runs:
            continue
        mean, std = {}, {}
        for col in columns + ("val_headline",):
            values = [r["val"][key] if col == "val_headline" else r["test"].get(col, r["test"].get(col.replace("_no_cca", ""))) for r in runs]
            mean[col], std[col] = _mean_std(values)
        out[name] = {"group": METHODS[name][0], "description": METHODS[name][1], "mean": mean, "std": std, "n": len(runs)}
        trained = [r for r in runs if r.get("best_step") is not None and r.get("last_step") is not None]
        if trained:
            out[name]["steps"] = {"best": float(np.mean([r["best_step"] for r in trained])), "last": float(np.mean([r["last_step"] for r in trained]))}
    full = {r["seed"]: r["test"][key] for r in records if r["method"] == "hscmae"}
    for name, s in out.items():  # paired by seed: the seed's own noise cancels
        diffs = [r["test"][key] - full[r["seed"]] for r in runs_of(records, name) if r["seed"] in full]
        if diffs and name != "hscmae":
            m, sd = _mean_std(diffs)
            s["paired_diff"] = {"metric": key, "mean": m, "std": sd, "n": len(diffs)}
        cost = selection_cost(runs_of(records, name))
        if cost:
            s["selection_cost"] = cost
    return out


def runs_of(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r["method"] == name]


def selection_cost(runs: list[dict]) -> dict | None:
    """Test class-level avg mAP of the same runs when the step is chosen by pairs vs by labels, paired per seed."""
    both = [r["by_signal"] for r in runs if set(r.get("by_signal", {})) >= {"pairs", "labels"}]
    if not both:
        return None
    pairs, labels = [b["pairs"]["test"]["avg"] for b in both], [b["labels"]["test"]["avg"] for b in both]
    out = {"n": len(both)}
    for name, values in (("pairs", pairs), ("labels", labels), ("diff", np.subtract(pairs, labels))):
        out[name] = dict(zip(("mean", "std"), _mean_std(list(values))))
    out["ratio"] = float(np.mean(pairs) / np.mean(labels))
    out["steps"] = {rule: float(np.mean([b[rule]["best_step"] for b in both])) for rule in ("pairs", "labels")}
    return out


def _steps(summary: dict) -> str:
    """Mean selected step / mean last step run (early stopping), or — for methods without training."""
    steps = summary.get("steps")
    return f"{steps['best']:.0f} / {steps['last']:.0f}" if steps else "—"


def _pm(summary: dict, col: str, digits: int = 3) -> str:
    return f"{summary['mean'][col]:.{digits}f} ± {summary['std'][col]:.{digits}f}"


def results_markdown(summary: dict[str, dict], meta: dict) -> str:
    rule = meta.get("select", "labels")
    lines = ["# HSC-MAE against its baselines", ""]
    intro = (
        f"Data: `{meta['data_source']}`; seeds {meta['seeds']}; test split, mean ± sample std over seeds. Each run's step was "
        f"selected on validation by **{rule}** ({'instance-level MRR of the embeddings: each clip’s own partner, no labels' if rule == 'pairs' else 'class-level avg mAP'}); "
        "test was read once per selected step. The test-time linear CCA (o' = {o}) is applied where it says so. "
    ).format(o=meta["config"]["cca"]["n_components"])
    if meta.get("labels", True):
        lines += [
            intro + "Class-level mAP: an item is relevant when it shares the query's class, full ranked list (spec §6). "
            "Instance-level: each clip's own partner is its one relevant item.",
            "",
            "| method | group | A→V | V→A | avg | avg no CCA | avg − HSC-MAE (paired) | R@1 A→V | R@10 A→V | med. rank A→V | pairs R@1 | pairs R@10 | pairs MRR | val avg | best / last step | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in summary.items():
            lines.append(
                f"| {s['description']} (`{name}`) | {s['group']} | {_pm(s, 'a2v')} | {_pm(s, 'v2a')} | **{_pm(s, 'avg')}** | {_pm(s, 'avg_no_cca')} | {_diff(s)} "
                f"| {_pm(s, 'a2v_r@1')} | {_pm(s, 'a2v_r@10')} | {s['mean']['a2v_median_rank']:.1f} | {_pm(s, 'pair_r@1')} | {_pm(s, 'pair_r@10')} | {_pm(s, 'pair_mrr')} "
                f"| {_pm(s, 'val_headline')} | {_steps(s)} | {s['n']} |"
            )
    else:
        lines += [
            intro + "**The data has no labels**, so there is no class-level mAP: every figure is instance-level retrieval, where each "
            "clip's own partner is its one relevant item (R@k, median rank and mean reciprocal rank, A→V and V→A averaged).",
            "",
            "| method | group | MRR | MRR no CCA | MRR − HSC-MAE (paired) | R@1 | R@10 | R@1 A→V | R@1 V→A | med. rank | val MRR | best / last step | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in summary.items():
            lines.append(
                f"| {s['description']} (`{name}`) | {s['group']} | **{_pm(s, 'pair_mrr')}** | {_pm(s, 'pair_mrr_no_cca')} | {_diff(s)} | {_pm(s, 'pair_r@1')} "
                f"| {_pm(s, 'pair_r@10')} | {_pm(s, 'pair_a2v_r@1')} | {_pm(s, 'pair_v2a_r@1')} | {s['mean']['pair_median_rank']:.1f} | {_pm(s, 'val_headline')} | {_steps(s)} | {s['n']} |"
            )
    costs = {name: s["selection_cost"] for name, s in summary.items() if "selection_cost" in s}
    if costs:
        lines += [
            "",
            "## What selecting without labels costs",
            "",
            "The same training runs, their step chosen on validation by pairs (instance-level MRR of the embeddings, no labels) or by labels "
            "(class-level avg mAP); test class-level avg mAP of each choice, the per-seed difference, and the ratio of the means.",
            "",
            "| method | by pairs | by labels | pairs − labels (paired) | pairs / labels | step by pairs / by labels | seeds |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in costs.items():
            lines.append(
                f"| `{name}` | {c['pairs']['mean']:.3f} ± {c['pairs']['std']:.3f} | {c['labels']['mean']:.3f} ± {c['labels']['std']:.3f} "
                f"| {c['diff']['mean']:+.3f} ± {c['diff']['std']:.3f} | {100 * c['ratio']:.1f} % | {c['steps']['pairs']:.0f} / {c['steps']['labels']:.0f} | {c['n']} |"
            )
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in PLOTS.values()), ""]
    if not meta.get("complete", True):
        lines.append("**Incomplete:** some (method, seed) runs had not finished; the `seeds` column says how many each row has.")
    if meta.get("report_only"):
        lines.append(f"Report rebuilt from the stored runs; sum of their per-run times: {meta['train_seconds_sum']:.0f} s.")
        if "compare_wall_seconds" in meta:
            lines.append(f"Wall time of the `compare` invocation that trained them: {meta['compare_wall_seconds']:.0f} s.")
    elif "wall_seconds_this_invocation" in meta:
        lines.append(f"Wall time of this `compare` invocation: {meta['wall_seconds_this_invocation']:.0f} s; sum of per-run times: {meta['train_seconds_sum']:.0f} s.")
    return "\n".join(lines) + "\n"


def _diff(summary: dict) -> str:
    d = summary.get("paired_diff")
    return f"{d['mean']:+.3f} ± {d['std']:.3f}" if d else "—"


def write_report(out: Path, records: list[dict], meta: dict) -> dict:
    """Write results.md, results.json and the plots into ``out``; returns the results.json dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "results.json"
    if meta.get("report_only") and previous.is_file():  # keep the wall time of the run that trained
        old = json.loads(previous.read_text())["meta"]
        wall = old.get("compare_wall_seconds", None if old.get("report_only") else old.get("wall_seconds_this_invocation"))
        if wall is not None:
            meta["compare_wall_seconds"] = wall
    summary = aggregate(records)
    per_seed = {name: [{k: v for k, v in r.items() if k != "history"} for r in runs_of(records, name)] for name in summary}
    results = {"meta": meta, "methods": {name: {**s, "runs": per_seed[name]} for name, s in summary.items()}, "plots": PLOTS}
    atomic_write(out / "results.json", json.dumps(results, indent=1))
    atomic_write(out / "results.md", results_markdown(summary, meta))
    plot_all(out, records, summary)
    return results


def plot_all(out: Path, records: list[dict], summary: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = sorted((r for r in records if r["method"] == "hscmae" and r["history"]), key=lambda r: r["seed"])
    if full:
        _plot_curves(plt, full, out / PLOTS["curves"])
        _plot_weights(plt, full, out / PLOTS["weights"])
    sweep = [(METHODS[n][2]["mask_ratio"], s) for n, s in summary.items() if s["group"] == "sweep"]
    if sweep and all("a2v" in s["mean"] for _, s in sweep):
        _plot_sweep(plt, sorted(sweep, key=lambda t: t[0]), out / PLOTS["mask"])
    _plot_methods(plt, summary, out / PLOTS["methods"])


def _evaluations(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps where every seed logged ``key`` (DCCA is absent during warm-up; runs stop early), mean and std."""
    n = min(len(r["history"]) for r in records)
    values = np.array([[h.get(key, np.nan) for h in r["history"][:n]] for r in records], dtype=float)
    logged = ~np.isnan(values).any(axis=0)
    x = np.array([h.get("step", i + 1) for i, h in enumerate(records[0]["history"][:n])])[logged]
    return x, values[:, logged].mean(axis=0), values[:, logged].std(axis=0)



def _plot_mean_band(ax, records: list[dict], key: str, label: str) -> None:
    """The per-evaluation mean of ``key`` over seeds, with a ± std band."""
    x, m, s = _evaluations(records, key)
    ax.plot(x, m, label=label)
    ax.fill_between(x, m - s, m + s, alpha=0.2)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def _plot_curves(plt, records: list[dict], path: Path) -> None:
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    for term in ("recon_intra", "recon_cross", "dcca", "soft_nce", "distill"):
        if any(term in h for r in records for h in r["history"]):
            _plot_mean_band(ax_loss, records, term, term)
    ax_loss.set(xlabel="optimiser step", ylabel="loss term (unweighted)", title="HSC-MAE loss terms (mean over seeds)")
    ax_loss.legend()
    for key, label in (("val_avg", "class mAP, test-time CCA"), ("val_avg_no_cca", "class mAP, cosine"), ("val_pair_mrr", "pairs MRR, test-time CCA"), ("val_pair_mrr_no_cca", "pairs MRR, cosine")):
        if all(key in h for r in records for h in r["history"]):
            _plot_mean_band(ax_map, records, key, label)
    ax_map.set(xlabel="optimiser step", ylabel="validation score", title="Validation (class mAP and pair MRR)")
    ax_map.legend()
    _save(plt, fig, path)


def _plot_weights(plt, records: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    keys = sorted({k for r in records for h in r["history"] for k in h if k.startswith("w_")})
    for key in keys:
        _plot_mean_band(ax, records, key, key[2:])
    ax.set(xlabel="optimiser step", ylabel="weight exp(−s_i) (mean since last evaluation)", title="Task weights (fixed during warm-up, then learned)")
    ax.legend()
    _save(plt, fig, path)


def _plot_sweep(plt, sweep: list[tuple[float, dict]], path: Path) -> None:
    rho = np.array([r for r, _ in sweep])
    a2v = np.array([s["mean"]["a2v"] for _, s in sweep])
    v2a = np.array([s["mean"]["v2a"] for _, s in sweep])
    avg = np.array([s["mean"]["avg"] for _, s in sweep])
    avg_std = np.array([s["std"]["avg"] for _, s in sweep])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.fill_between(rho, np.minimum(a2v, v2a), np.maximum(a2v, v2a), alpha=0.25, label="gap A→V vs V→A")
    ax.plot(rho, a2v, "o--", label="A→V")
    ax.plot(rho, v2a, "s--", label="V→A")
    ax.errorbar(rho, avg, yerr=avg_std, fmt="k-", capsize=3, label="avg (± std over seeds)")
    ax.set(xlabel="mask ratio ρ", ylabel="test mAP", title="HSC-MAE: mAP against mask ratio")
    ax.legend()
    _save(plt, fig, path)


def _plot_methods(plt, summary: dict[str, dict], path: Path) -> None:
    names = [n for n, s in summary.items() if s["group"] != "sweep"]
    colours = {"method": "tab:red", "baseline": "tab:blue", "ablation": "tab:orange"}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    y = np.arange(len(names))[::-1]
    key = "avg" if all("avg" in summary[n]["mean"] for n in names) else "pair_mrr"
    ax.barh(y, [summary[n]["mean"][key] for n in names], xerr=[summary[n]["std"][key] for n in names], color=[colours[summary[n]["group"]] for n in names], capsize=3)
    ax.set_yticks(y, names)
    lo = min(summary[n]["mean"][key] for n in names)
    ax.set_xlim(max(0.0, lo - 0.05), None)
    what = "class-level avg mAP" if key == "avg" else "instance-level MRR (no labels)"
    ax.set(xlabel=f"test {what} (with test-time CCA), mean ± std over seeds", title="Methods, baselines (blue), ablations (orange)")
    _save(plt, fig, path)
