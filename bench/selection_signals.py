"""Which label-free validation signal picks the step that class-level mAP would pick?

Reads the stored runs of ``python -m training compare`` (their per-evaluation validation history
holds the class-level avg mAP and the instance-level figures of the same evaluations), replays the
training loop's selection and early-stopping rule (``training.train.Selection``) on each candidate
signal, and reports, per data set and method, the **validation class-level avg mAP at the step each
signal selects**, its shortfall from the best step the history holds, and the Spearman correlation
of the signal with class mAP over the evaluations. Labels are read here only to score the signals.

A run's history ends when every rule it tracked (pairs and labels) had stopped, so a candidate that
would have trained on is cut there; say so beside the figures.

    python bench/selection_signals.py reports/select/mfeat-fac-kar reports/select/mfeat-kar-zer reports/select/default
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.config import config_from_dict
from training.train import Selection, plan_schedule

# candidate -> its score from one history entry, higher is better (scores start above Selection's -1).
CANDIDATES = {
    "pair MRR (CCA)": lambda h: h["val_pair_mrr"], "pair MRR (cosine)": lambda h: h["val_pair_mrr_no_cca"],
    "pair R@1": lambda h: h["val_pair_r@1"], "pair R@10": lambda h: h["val_pair_r@10"],
    "1 / pair median rank": lambda h: 1 / h["val_pair_median_rank"],
}


class _Unsaved:
    def state_dict(self):  # the replay needs the step, not the weights
        return None


def replay(history: list[dict], score, schedule) -> int:
    """The step ``training.train.Selection`` picks when it reads ``score(entry)`` of the history."""
    selection = Selection("pairs")
    selection.key = "score"
    for h in history:
        selection.update(h["step"], {"score": score(h)}, _Unsaved(), schedule)
    return selection.best["step"]


def spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def analyse(report: Path) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    for path in sorted((report / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        history = run.get("history") or []
        if not history or "val_avg" not in history[0]:
            continue
        cfg = config_from_dict({k: v for k, v in run["key"]["config"].items() if k != "seed"})  # compare adds the seed to its key
        schedule = plan_schedule(cfg.train, cfg.objective.warmup_steps, n_train=10**6)  # patience, min_steps, min_delta
        class_map = {h["step"]: h["val_avg"] for h in history}
        best = max(class_map.values())
        row = out.setdefault(run["method"], {})
        row.setdefault("class mAP (labels)", []).append((class_map[replay(history, lambda h: h["val_avg"], schedule)], best, 1.0))
        for name, score in CANDIDATES.items():
            step = replay(history, score, schedule)
            rho = spearman([score(h) for h in history], [h["val_avg"] for h in history])
            row.setdefault(name, []).append((class_map[step], best, rho))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/selection_signals.md"))
    args = parser.parse_args()
    lines = [
        "# Label-free selection signals against class-level mAP (validation)",
        "",
        "Validation class-level avg mAP at the step each signal selects (same selection and early-stopping rule), "
        "its shortfall from the best step in the history, and Spearman ρ of the signal with class mAP over the "
        "evaluations; mean over seeds. `python bench/selection_signals.py " + " ".join(str(r) for r in args.reports) + "`",
        "",
    ]
    for report in args.reports:
        table = analyse(report)
        if not table:
            continue
        signals = list(next(iter(table.values())))
        lines += [f"## {report.name}", "", "| method | " + " | ".join(signals) + " |", "|---|" + "---|" * len(signals)]
        for method, cols in table.items():
            cells = []
            for signal in signals:
                chosen, best, rho = (np.array(v) for v in zip(*cols[signal]))
                cells.append(f"{chosen.mean():.3f} (−{(best - chosen).mean():.3f}, ρ {rho.mean():.2f})")
            lines.append(f"| `{method}` ({len(cols[signals[0]])} seeds) | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
