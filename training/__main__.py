"""Command line: ``python -m training {make-data,train,eval,compare,tune,export} ...``.

DATA is a feature directory, an HDF5 file in the authors' layout, or ``synthetic``.
Errors in the input end the command with exit code 2 and one readable line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from training.baselines import method_config
from training.compare import compare, data_fingerprint, default_methods
from training.config import load_config
from training.data import atomic_write, load_features, save_directory
from training.export import export_run
from training.metrics import SELECTION_METRICS
from training.synthetic import generate
from training.train import CHECKPOINT_NAME, evaluate_model, load_checkpoint, save_checkpoint, train
from training.tune import BEST_PRESET, tune

STATE_NAME = "train_state.pt"
SELECT_HELP = (
    "validation signal that selects the step, stops training and scores tuning trials: pairs (each clip's own partner, "
    "instance-level MRR of the embeddings; needs no labels), labels (class-level mAP) or auto (the preset's train.select; auto = pairs, "
    "see training/README.md)"
)  # full training state after each evaluation, for --resume


def _cmd_make_data(args) -> None:
    cfg = load_config(args.config)
    if args.seed is not None:
        cfg.synthetic.seed = args.seed
    data = generate(cfg.synthetic)
    save_directory(data, args.out)
    print(f"wrote {len(data)} clips ({data.audio_dim}-d audio, {data.visual_dim}-d visual) to {args.out}")


def _load_data(spec: str, cfg):
    # 8-bit feature files stay 8-bit in memory (a quarter of float32's); batches are de-quantised.
    return generate(cfg.synthetic) if spec == "synthetic" else load_features(spec, keep_8bit=True)


def _cmd_train(args) -> None:
    if args.method == "linear-cca":
        raise ValueError("linear-cca has no encoder to train or export; it is reported by `compare`")
    cfg = _with_select(load_config(args.config), args)
    cfg = method_config(cfg, args.method or cfg.train.method)  # a tuned preset names its own method
    if args.seed is not None:
        cfg.train.seed = args.seed
    data = _load_data(args.data, cfg)
    run = Path(args.out)
    result = train(cfg, data, show_progress=not args.quiet, state_path=run / STATE_NAME, resume=args.resume)
    digest = save_checkpoint(run / CHECKPOINT_NAME, cfg, data, result)
    # The selected checkpoint's test figure, reported once; selection never saw it.
    test = evaluate_model(result.model, result.cca, data.subset("test"))
    last_step = result.history[-1]["step"] if result.history else 0
    summary = {
        "val": result.val_metrics, "test": test, "best_step": result.best_step, "last_step": last_step, "schedule": dataclasses.asdict(result.schedule),
        "selected_by": {"rule": cfg.train.select, "signal": result.select, "metric": SELECTION_METRICS[result.select]},
    }
    atomic_write(run / "metrics.json", json.dumps(summary, indent=2))
    print(
        f"saved {run / CHECKPOINT_NAME} (sha256 {digest[:12]}, method {cfg.train.method}, best step {result.best_step} of {last_step} run, "
        f"budget {result.schedule.max_steps}, selected by validation {result.select}: {SELECTION_METRICS[result.select]} {result.val_metrics[SELECTION_METRICS[result.select]]:.4f})"
    )
    _print_table(test, result.cca is not None)


def _cmd_compare(args) -> None:
    cfg = _with_select(load_config(args.config), args)
    data = _load_data(args.data, cfg)
    methods = args.methods.split(",") if args.methods else None
    tuned = _tune_each(cfg, data, methods or default_methods(cfg), args) if args.tune else None
    results = compare(cfg, data, args.seeds, Path(args.out), methods=methods, show_progress=not args.quiet, report_only=args.report_only, method_configs=tuned)
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.md, results.json and {len(results['plots'])} plots")


def _tune_each(cfg, data, methods: list[str], args) -> dict:
    """Every trainable method gets the same trial budget on validation before its seeds run."""
    # A shared database holds studies of every data set: the data's fingerprint keeps them apart.
    suffix = f"-{data_fingerprint(data)[:12]}" if args.storage else ""
    tuned = {}
    for name in methods:
        if name == "linear-cca":
            continue
        result = tune(cfg, data, name, args.tune, Path(args.out) / "tune" / name, storage=args.storage, study_name=name + suffix, show_progress=not args.quiet)
        print(f"tuned {name}: validation {result.select} score {result.val_score:.4f} after {result.trials} trials ({result.seconds:.0f} s)")
        tuned[name] = result.config
    return tuned


def _cmd_tune(args) -> None:
    cfg = _with_select(load_config(args.config), args)
    if args.seed is not None:
        cfg.train.seed = args.seed
    data = _load_data(args.data, cfg)
    result = tune(cfg, data, args.method, args.trials, Path(args.out), storage=args.storage, study_name=args.study, show_progress=not args.quiet)
    print(f"best validation score {result.val_score:.4f} (selected by {result.select}) over {result.trials} trials ({result.seconds:.0f} s this run)")
    print(f"wrote {Path(args.out) / BEST_PRESET}; train with: python -m training train --config {Path(args.out) / BEST_PRESET} --data {args.data} --out RUN")


def _with_select(cfg, args):
    """The preset with ``--select`` applied (a tuned preset keeps its own rule unless one is given)."""
    if args.select is not None:
        cfg.train.select = args.select
    return cfg


def _print_table(m: dict, with_cca: bool, split: str = "test") -> None:
    projected = "with CCA" if with_cca else "cosine"
    if "avg" in m:
        print(f"{split} class-level mAP (fraction; an item is relevant when it shares the query's class; full ranked list, spec §6)")
        print(f"  {'':10s} {'A→V':>7s} {'V→A':>7s} {'avg':>7s}")
        if with_cca:
            print(f"  {'no CCA':10s} {m['a2v_no_cca']:7.4f} {m['v2a_no_cca']:7.4f} {m['avg_no_cca']:7.4f}")
        print(f"  {projected:10s} {m['a2v']:7.4f} {m['v2a']:7.4f} {m['avg']:7.4f}")
    else:
        print(f"{split}: no labels, so no class-level mAP; instance-level figures only")
    print(f"{split} instance-level retrieval (each clip's own partner is its one relevant item; {projected})")
    print(f"  {'':6s} {'R@1':>7s} {'R@5':>7s} {'R@10':>7s} {'MRR':>7s} {'med. rank':>10s}")
    for name in ("a2v", "v2a"):
        print(f"  {name.replace('2', '→').upper():6s} " + " ".join(f"{m[f'pair_{name}_{k}']:7.4f}" for k in ("r@1", "r@5", "r@10", "mrr")) + f" {m[f'pair_{name}_median_rank']:10.1f}")


def _cmd_eval(args) -> None:
    cfg, model, cca, _, _ = load_checkpoint(Path(args.run))
    data = _load_data(args.data, cfg)
    m = evaluate_model(model, cca, data.subset(args.split))
    _print_table(m, cca is not None, args.split)
    keys = ("a2v", "v2a", "avg", "pair_mrr", "pair_mrr_no_cca", "pair_r@1", "pair_r@10", "pair_median_rank")
    print(json.dumps({k: m[k] for k in keys if k in m}))


def _cmd_export(args) -> None:
    manifest = export_run(args.run, args.out)
    print(f"exported to {args.out}: embedding width {manifest['embedding_dim']}, parity {manifest['parity_max_abs_diff']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-data", help="write the embedded synthetic default as a feature directory")
    p.add_argument("--config", default="default", help="preset whose `synthetic` section to use")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_make_data)

    p = sub.add_parser("train", help="train, select on validation, report test")
    p.add_argument("--config", default="default", help="preset name (tiny, default, paper) or YAML path")
    p.add_argument("--data", default="synthetic", help="feature directory, HDF5 file, or 'synthetic'")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--method", default=None, help="hscmae, a baseline (dcca, mae, clip, cavmae), an ablation (no-dcca, ...) or rho=R (default: the preset's, hscmae)")
    p.add_argument("--select", default=None, choices=["auto", "pairs", "labels"], help=SELECT_HELP)
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{STATE_NAME}")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="HSC-MAE vs baselines, ablations and mask-ratio sweep over seeds; writes a report")
    p.add_argument("--config", default="default")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", required=True, help="report directory (runs/ inside makes it resumable)")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--select", default=None, choices=["auto", "pairs", "labels"], help=SELECT_HELP)
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs in OUT/runs")
    p.add_argument("--tune", type=int, default=0, metavar="N", help="first tune every method with N trials on validation (OUT/tune/<method>)")
    p.add_argument("--storage", default=None, help="Optuna storage URL shared by the tuning studies (default: SQLite per method)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("tune", help="Optuna search of a method's hyper-parameters on validation mAP; writes OUT/best.yaml")
    p.add_argument("--method", default="hscmae")
    p.add_argument("--config", default="default", help="the preset the search starts from")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--trials", type=int, required=True, help="finished trials the study should hold (a rerun resumes)")
    p.add_argument("--out", required=True, help="study folder: study.db, best.yaml, tuning.json, tuning_history.png")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///OUT/study.db); workers sharing it work one study")
    p.add_argument("--select", default=None, choices=["auto", "pairs", "labels"], help=SELECT_HELP)
    p.add_argument("--study", default=None, help="study name (default: the method)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("eval", help="evaluate a run (class-level mAP when the data has labels, instance-level always); ends with one JSON line")
    p.add_argument("--run", required=True)
    p.add_argument("--data", default="synthetic")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export ONNX encoders + manifest.json")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_export)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
