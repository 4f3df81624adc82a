"""Training: a loop that knows nothing about the model, EMA teacher, validation selection, test-time CCA.

Selection uses the validation split only; the test split is touched once, by ``evaluate``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.cca import LinearCCA, fit_linear_cca
from training.config import Config, TrainConfig, config_from_dict, config_to_dict
from training.data import YOUTUBE8M, PairedFeatures, atomic_write, dequantized, feature_stats
from training.hscmae import TaskWeights, active_terms, ema_update, hscmae_step, momentum_at
from training.metrics import SELECTION_METRICS, retrieval_metrics
from training.model import AVModel

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def embed_all(model: AVModel, modality: str, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """(N, D) features -> (N, E) embeddings, in eval mode, in batches."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.embed(modality, torch.from_numpy(dequantized(x[i : i + batch_size])).to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def fit_test_time_cca(model: AVModel, train: PairedFeatures, cfg: Config) -> LinearCCA:
    """Linear CCA on embeddings of the clean training split (spec §5)."""
    return fit_linear_cca(embed_all(model, "audio", train.audio), embed_all(model, "visual", train.visual), cfg.cca.n_components, cfg.cca.ridge)


EVAL_MAX_QUERIES = 10_000  # larger splits are scored with a seeded query sample against the whole gallery


def evaluate_model(model: AVModel, cca: LinearCCA | None, data: PairedFeatures, max_queries: int = EVAL_MAX_QUERIES) -> dict[str, float]:
    """Retrieval metrics of ``data`` with the CCA projection (when given) and without it (``*_no_cca``).

    Instance-level (``pair_*``: each clip's partner) always; class-level mAP when ``data`` has labels.
    """
    z_a, z_v = embed_all(model, "audio", data.audio), embed_all(model, "visual", data.visual)
    plain = retrieval_metrics(z_a, z_v, data.labels, max_queries)
    out = plain if cca is None else retrieval_metrics(cca.transform(z_a, "a"), cca.transform(z_v, "b"), data.labels, max_queries)
    # ``*_no_cca``: the embeddings themselves (the same figures when there is no CCA); pairs selection reads them.
    return {**out, **{f"{k}_no_cca": v for k, v in plain.items() if k in ("a2v", "v2a", "avg", "pair_mrr", "pair_r@1", "pair_r@10")}}


def selection_signal(select: str, data: PairedFeatures) -> str:
    """``labels`` or ``pairs``: what ``--select`` (``auto``, ``pairs``, ``labels``) means on ``data``."""
    if select not in ("auto", *SELECTION_METRICS):
        raise ValueError(f"unknown selection rule {select!r}; expected auto, pairs or labels")
    if select == "labels" and data.labels is None:
        raise ValueError(f"{data.source}: has no labels (labels.npy), so it cannot select by labels; use --select pairs (or auto)")
    if select == "auto":
        return "labels" if AUTO_SELECTION == "labels" and data.labels is not None else "pairs"
    return select


# What ``--select auto`` uses when labels are there (see training/README.md for the measurement).
AUTO_SELECTION = "pairs"


class Selection:
    """The best validation point under one signal, and its early-stopping state.

    Selection takes the best score; patience counts from the last step that beat the previous
    progress point by min_delta, so the slow creep of a decaying learning rate does not keep a flat
    run going to the end of its budget. Once patience runs out the selection is final: later
    evaluations (made for another signal) do not change it, so a run tracking several signals
    selects for each exactly what a run tracking that one alone would.
    """

    def __init__(self, signal: str, state: dict | None = None):
        self.signal, self.key = signal, SELECTION_METRICS[signal]
        self.best = {"score": -1.0, "step": 0, "state": None, "val": None}
        self.progress = {"score": -1.0, "step": 0}
        self.stopped = False
        if state is not None:
            self.best, self.progress, self.stopped = state["best"], state["progress"], state["stopped"]

    def update(self, step: int, val: dict, model: AVModel, schedule: "Schedule") -> None:
        if self.stopped:
            return
        score = val[self.key]
        if score > self.best["score"]:
            self.best = {"score": score, "step": step, "state": copy.deepcopy(model.state_dict()), "val": val}
        if score > self.progress["score"] + schedule.min_delta:
            self.progress = {"score": score, "step": step}
        self.stopped = _patience_ran_out(step, self.progress["step"], schedule)

    def state_dict(self) -> dict:
        return {"best": self.best, "progress": self.progress, "stopped": self.stopped}


@dataclass
class TrainResult:
    model: AVModel  # the evaluated model: the EMA teacher (or the student when there is none)
    cca: LinearCCA | None  # test-time CCA fitted on that model's clean training embeddings
    val_metrics: dict  # of the selected model on the whole validation split
    best_step: int  # the optimiser step whose model was selected on validation
    history: list[dict]  # one dict per evaluation: step, epoch, mean loss terms and weights, validation figures
    schedule: "Schedule"  # what the recipe derived from the data's size
    select: str = "pairs"  # the signal that chose best_step: "pairs" (instance-level) or "labels" (class mAP)
    others: dict[str, "TrainResult"] = dataclasses.field(default_factory=dict)  # the same run selected by ``also_select``


def _autocast(device: torch.device, enabled: bool):
    # bfloat16 needs no loss scaler; the DCCA term leaves autocast and runs in float64 itself.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def run_steps(step_fn, batches, after_step) -> dict[str, float]:
    """Run ``step_fn(batch) -> StepOutput`` over ``batches``; stop on a non-finite loss.

    ``after_step(output)`` does the optimiser work. Returns the means of every logged value.
    """
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        out = step_fn(batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite loss {float(out.loss)} (terms {out.terms})")
        after_step(out)
        logged = {"loss": float(out.loss.detach()), **out.terms, **{f"w_{k}": v for k, v in out.weights.items()}, **out.diagnostics}
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}


@dataclass
class Schedule:
    """What the recipe derives from the training split's size N (logged and kept in the history)."""

    batch_size: int
    steps_per_epoch: int
    max_steps: int
    eval_every: int
    patience: int
    min_steps: int
    min_delta: float

    @property
    def max_epochs(self) -> float:
        return self.max_steps / self.steps_per_epoch


def plan_schedule(cfg: TrainConfig, warmup_steps: int, n_train: int) -> Schedule:
    """Batch capped so an epoch has ≥ ``min_batches_per_epoch`` steps; validation once an epoch, 25 to 100 steps apart."""
    batch_size = max(1, min(cfg.batch_size, n_train // max(cfg.min_batches_per_epoch, 1)))
    steps_per_epoch = max(1, n_train // batch_size)
    # Tiny splits have epochs of a few steps; validating each would cost more than training.
    eval_every = cfg.eval_every or min(max(steps_per_epoch, 25), 100)
    min_steps = cfg.min_steps or warmup_steps  # the weights only start to learn after the warm-up
    return Schedule(batch_size, steps_per_epoch, cfg.max_steps, eval_every, cfg.patience, min_steps, cfg.min_delta)


class BatchStream:
    """Shuffled row batches, epoch after epoch, drawn from an explicit generator; resumable."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order: torch.Tensor | None = None
        self.position = 0

    def take(self, count: int) -> list[torch.Tensor]:
        out = []
        for _ in range(count):
            if self.order is None or self.position + self.batch_size > self.n:  # drop the ragged tail
                self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
            out.append(self.order[self.position : self.position + self.batch_size])
            self.position += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.position = state["order"], state["position"]


def _selection_rows(data: PairedFeatures, limit: int, seed: int) -> PairedFeatures:
    """At most ``limit`` rows of a split, a seeded sample when larger: selection cost stays bounded."""
    if limit <= 0 or len(data) <= limit:
        return data
    return data.take(np.sort(np.random.default_rng(seed).choice(len(data), limit, replace=False)))


def _scaled_model(cfg: Config, data: PairedFeatures, train_split: PairedFeatures) -> AVModel:
    model = AVModel(data.audio_dim, data.visual_dim, cfg.model)
    for modality in ("audio", "visual"):
        x = getattr(train_split, modality)
        if x.dtype == np.uint8:  # 8-bit codes: statistics a block at a time, never a float copy of them all
            mean, std = (torch.from_numpy(s) for s in feature_stats(x))
        else:
            mean, std = torch.from_numpy(x).mean(0), torch.from_numpy(x).std(0)
        model.towers[modality].set_scaling(mean, std)
    return model


def _as_floats(x: torch.Tensor) -> torch.Tensor:
    """A batch of features as float32: uint8 codes (``keep_8bit``) de-quantised here, per batch."""
    if x.dtype != torch.uint8:
        return x
    return x.float() * YOUTUBE8M.step + YOUTUBE8M.bias  # float32 multiply, then add: as avdata.dequantize


def _rng_states() -> dict:
    """CPU and (when present) every CUDA generator: dropout draws on a GPU come from the latter."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _restore_rng_states(states) -> None:
    if isinstance(states, torch.Tensor):  # states written before CUDA generators were saved
        states = {"cpu": states, "cuda": []}
    torch.set_rng_state(states["cpu"])
    if states["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(states["cuda"]):
            raise ValueError("the training state holds CUDA random states for another set of devices; resume on the same devices")
        torch.cuda.set_rng_state_all(states["cuda"])


def train(
    cfg: Config, data: PairedFeatures, show_progress: bool = True, state_path: Path | None = None, resume: bool = False,
    stop_after: int | None = None, on_evaluation=None, also_select: tuple[str, ...] = (),
) -> TrainResult:
    """Train the objective ``cfg.objective``, select the step on validation, fit test-time CCA.

    The budget is ``cfg.train.max_steps`` optimiser steps; validation runs every
    ``Schedule.eval_every`` steps. ``cfg.train.select`` names the signal read there
    (:func:`selection_signal`): ``pairs`` (each clip's own partner; no labels) or ``labels``
    (class-level mAP). Training stops early after ``patience`` steps without a gain of
    ``min_delta`` in it, and its best validation point is selected. ``also_select`` names other
    signals to select by in the same run (compare measures what a rule costs this way); training
    then goes on until every signal has stopped, and ``TrainResult.others`` holds their selections.
    With ``state_path`` the full training state is written there after every evaluation; ``resume``
    continues from it. ``stop_after`` ends this call after that many evaluations (a later ``resume``
    finishes the run). ``on_evaluation(step, score)`` is called after each evaluation with the
    selection signal's score (tuning prunes through it).
    """
    if cfg.train.threads > 0:  # process-wide: small models on shared cores lose most time to thread sync
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    obj = cfg.objective
    names = active_terms(obj)
    signals = list(dict.fromkeys(selection_signal(rule, data) for rule in (cfg.train.select, *also_select)))
    signal = signals[0]
    train_split, val_split = data.subset("train"), data.subset("val")
    cca_fit_split = _selection_rows(train_split, cfg.train.select_rows, cfg.train.seed)
    val_sample = _selection_rows(val_split, cfg.train.select_rows, cfg.train.seed + 1)
    schedule = plan_schedule(cfg.train, obj.warmup_steps, len(train_split))
    student = _scaled_model(cfg, data, train_split).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False).eval() if obj.teacher else None
    task_weights = TaskWeights(names).to(device)
    optimiser = torch.optim.AdamW(
        [
            {"params": student.parameters(), "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay},
            {"params": task_weights.parameters(), "lr": obj.log_var_lr, "weight_decay": 0.0},
        ]
    )
    base_lrs = [cfg.train.lr, obj.log_var_lr]
    audio = torch.from_numpy(train_split.audio).to(device)
    visual = torch.from_numpy(train_split.visual).to(device)
    generator = torch.Generator().manual_seed(cfg.train.seed)  # batch order and masks, on the CPU
    stream = BatchStream(len(train_split), schedule.batch_size, generator)
    evaluated = teacher if teacher is not None else student

    global_step, history = 0, []
    selections = {name: Selection(name) for name in signals}
    if resume and state_path is not None and Path(state_path).is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["config"] != config_to_dict(cfg) or list(state.get("selections", {})) != signals:
            raise ValueError(f"{state_path}: written by a different configuration; resume with the same --config/--method/--seed/--select or use a new --out")
        student.load_state_dict(state["student"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        task_weights.load_state_dict(state["task_weights"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        stream.load_state_dict(state["batches"])
        _restore_rng_states(state["rng"])
        global_step, history = state["global_step"], state["history"]
        selections = {name: Selection(name, saved) for name, saved in state["selections"].items()}
        log.info("resumed from %s at step %d", state_path, global_step)
    log.info(
        "%s: N=%d train clips, batch %d, %d steps/epoch, budget %d steps (%.1f epochs), validation every %d steps, patience %d, selection by %s",
        cfg.train.method, len(train_split), schedule.batch_size, schedule.steps_per_epoch, schedule.max_steps, schedule.max_epochs, schedule.eval_every, schedule.patience,
        ", ".join(f"validation {name} ({SELECTION_METRICS[name]})" for name in signals),
    )

    def step_fn(rows):
        student.train()
        with _autocast(device, cfg.train.amp):
            a, v = _as_floats(audio[rows.to(device)]), _as_floats(visual[rows.to(device)])
            return hscmae_step(student, teacher, task_weights, obj, a, v, generator, global_step)

    def after_step(out):
        nonlocal global_step
        for group, base in zip(optimiser.param_groups, base_lrs):  # cosine schedule over the budget
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * min(global_step / schedule.max_steps, 1.0)))
        optimiser.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.grad_clip)
        optimiser.step()
        task_weights.clamp_(obj.log_var_min, obj.log_var_max)
        if teacher is not None:
            ema_update(teacher, student, momentum_at(global_step, schedule.max_steps, obj.momentum_start, obj.momentum_end))
        global_step += 1

    evaluations = 0
    primary = selections[signal]
    bar = tqdm(total=schedule.max_steps, initial=global_step, desc=f"train {cfg.train.method}", disable=not show_progress, unit="step")
    while global_step < schedule.max_steps and not all(s.stopped for s in selections.values()):
        if stop_after is not None and evaluations >= stop_after:
            break
        count = min(schedule.eval_every, schedule.max_steps - global_step)
        means = run_steps(step_fn, stream.take(count), after_step)
        bar.update(count)
        cca = fit_test_time_cca(evaluated, cca_fit_split, cfg) if cfg.cca.enabled else None
        val = evaluate_model(evaluated, cca, val_sample)
        means.update({"step": global_step, "epoch": global_step / schedule.steps_per_epoch})
        means.update({f"val_{key}": value for key, value in val.items() if key in HISTORY_METRICS})
        history.append(means)
        evaluations += 1
        for selection in selections.values():
            selection.update(global_step, val, evaluated, schedule)
        bar.set_postfix(loss=f"{means['loss']:.3f}", val=f"{val[primary.key]:.3f}", best_step=primary.best["step"], refresh=False)
        if on_evaluation is not None:
            on_evaluation(global_step, val[primary.key])
        if state_path is not None:
            state = {
                "student": student.state_dict(),
                "teacher": teacher.state_dict() if teacher is not None else None,
                "task_weights": task_weights.state_dict(),
                "optimiser": optimiser.state_dict(),
                "generator": generator.get_state(),
                "batches": stream.state_dict(),
                "rng": _rng_states(),
                "global_step": global_step,
                "history": history,
                "selections": {name: s.state_dict() for name, s in selections.items()},
                "config": config_to_dict(cfg),
            }
            _atomic_save(state, Path(state_path))
    bar.close()
    final_state = copy.deepcopy(evaluated.state_dict())
    evaluated = evaluated.cpu().eval()

    def selected(selection: Selection) -> TrainResult:  # test-time CCA refitted on the whole train split
        model = copy.deepcopy(evaluated)
        model.load_state_dict(selection.best["state"] or final_state)
        cca = fit_test_time_cca(model, train_split, cfg) if cfg.cca.enabled else None
        val = evaluate_model(model, cca, val_split, max_queries=cfg.train.select_rows)
        return TrainResult(model, cca, val, selection.best["step"], history, schedule, selection.signal)

    result = selected(primary)
    result.others = {name: selected(s) for name, s in selections.items() if s is not primary}
    log.info("%s: selected step %d by validation %s (%s %.4f)", cfg.train.method, result.best_step, signal, primary.key, result.val_metrics[primary.key])
    return result


# Validation figures kept in the history of every evaluation (plots, and measuring selection rules).
HISTORY_METRICS = ("avg", "avg_no_cca", "pair_mrr", "pair_mrr_no_cca", "pair_r@1", "pair_r@10", "pair_median_rank")


def _patience_ran_out(step: int, progress_step: int, schedule: Schedule) -> bool:
    return schedule.patience > 0 and step >= schedule.min_steps and step - progress_step >= schedule.patience


def _atomic_save(obj, path: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    blob = buffer.getvalue()
    atomic_write(path, blob)
    return blob


def save_checkpoint(path: Path, cfg: Config, data: PairedFeatures, result: TrainResult) -> str:
    """Write the checkpoint atomically; it embeds its config. Returns its sha256."""
    payload = {
        "config": config_to_dict(cfg),
        "audio_dim": data.audio_dim,
        "visual_dim": data.visual_dim,
        "state_dict": result.model.state_dict(),  # the evaluated (teacher) model
        "cca": result.cca.to_dict() if result.cca is not None else None,
        "val_metrics": result.val_metrics,
        "best_step": result.best_step,
        "schedule": dataclasses.asdict(result.schedule),
        "history": result.history,
        "data_source": data.source,
    }
    blob = _atomic_save(payload, Path(path))
    return hashlib.sha256(blob).hexdigest()


def load_checkpoint(run_dir: Path) -> tuple[Config, AVModel, LinearCCA | None, dict, str]:
    """(config, model in eval mode, cca, raw payload, sha256 of the file)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (train a model first: python -m training train ...)")
    blob = path.read_bytes()
    try:
        payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        cfg = config_from_dict(payload["config"])
    except Exception as err:  # torch raises pickle, zip and runtime errors for a damaged file
        raise ValueError(f"{path}: not a readable avsearch checkpoint ({type(err).__name__}: {err})") from None
    model = AVModel(payload["audio_dim"], payload["visual_dim"], cfg.model)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    cca = LinearCCA.from_dict(payload["cca"]) if payload["cca"] is not None else None
    return cfg, model, cca, payload, hashlib.sha256(blob).hexdigest()
