"""Helper of bench/gpu_check.sh: the project's GPU paths, run once, with their figures.

    python bench/gpu_check.py env                       # versions, providers, GPUs
    python bench/gpu_check.py config --preset default --device cuda --steps 200 --out F.yaml
    python bench/gpu_check.py train-speed --preset default --device cuda --steps 200 --budget-s 30 --data DIR
    python bench/gpu_check.py embed --model DIR --data DIR
    python bench/gpu_check.py service --model DIR --index DIR --device cuda --workers 2 --requests 300
    python bench/gpu_check.py report                    # $OUT/figures.jsonl -> $OUT/gpu_check.md

Every subcommand appends one JSON object to $OUT/figures.jsonl (OUT defaults to .gpu/out), so a
step that hangs or fails loses only its own figures. Falls back to the CPU where there is no CUDA
(torch or ONNX Runtime) and says so in what it records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = Path(os.environ.get("OUT") or REPO / ".gpu" / "out")


def record(kind: str, **values) -> dict:
    entry = {"kind": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **values}
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "figures.jsonl", "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
    print("FIGURES", json.dumps(entry, default=str), flush=True)
    return entry


def _ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# --- env --------------------------------------------------------------------------------------------


def cmd_env(args) -> None:
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["torch_cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["cudnn"] = torch.backends.cudnn.version()
    except Exception as err:  # noqa: BLE001 - recorded
        info["torch_error"] = f"{type(err).__name__}: {err}"
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_file"] = ort.__file__
        info["onnxruntime_device"] = ort.get_device()
        info["onnxruntime_providers"] = ort.get_available_providers()
        try:
            info["onnxruntime_build"] = ort.get_build_info()
        except Exception:  # noqa: BLE001
            pass
    except Exception as err:  # noqa: BLE001
        info["onnxruntime_error"] = f"{type(err).__name__}: {err}"
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_file"] = faiss.__file__
        info["faiss_num_gpus"] = getattr(faiss, "get_num_gpus", lambda: 0)()
    except Exception as err:  # noqa: BLE001
        info["faiss_error"] = f"{type(err).__name__}: {err}"
    for name in ("fastapi", "pydantic", "uvicorn", "numpy"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception as err:  # noqa: BLE001
            info[name] = f"missing ({type(err).__name__})"
    info["LD_LIBRARY_PATH"] = os.environ.get("LD_LIBRARY_PATH", "")
    record("env", **info)


# --- training ---------------------------------------------------------------------------------------


def _config_dict(preset: str, device: str, steps: int, eval_every: int, amp: bool, threads: int | None) -> dict:
    import yaml

    values = yaml.safe_load((REPO / "training" / "configs" / f"{preset}.yaml").read_text())
    train = values.setdefault("train", {})
    train.update({"max_steps": steps, "patience": 0, "device": device, "eval_every": eval_every, "amp": amp})
    if threads is not None:
        train["threads"] = threads
    return values


def cmd_config(args) -> None:
    import yaml

    values = _config_dict(args.preset, args.device, args.steps, args.eval_every, args.amp, args.threads)
    Path(args.out).write_text(yaml.safe_dump(values, sort_keys=False))
    print(f"wrote {args.out}: {values['train']}")


class _OutOfBudget(Exception):
    pass


def cmd_train_speed(args) -> None:
    """Optimiser steps/s of the project's training loop (training.train.train), timed inside
    run_steps (evaluations between chunks excluded); the first chunk (warm-up) reported apart."""
    import torch

    import training.train as tt
    from avdata.features import load_features
    from training.config import config_from_dict

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        record("train_speed", preset=args.preset, device="cuda", skipped="torch sees no CUDA device")
        return
    cfg = config_from_dict(_config_dict(args.preset, device, args.steps, args.chunk, args.amp, args.threads))
    data = load_features(args.data, keep_8bit=True)
    chunks: list[tuple[int, float]] = []
    original = tt.run_steps
    started = time.perf_counter()

    def timed(step_fn, batches, after_step):
        batches = list(batches)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = original(step_fn, batches, after_step)
        if device == "cuda":
            torch.cuda.synchronize()
        chunks.append((len(batches), time.perf_counter() - t0))
        if time.perf_counter() - started > args.budget_s and sum(n for n, _ in chunks) < args.steps:
            raise _OutOfBudget
        return out

    tt.run_steps = timed
    stopped = False
    try:
        tt.train(cfg, data, show_progress=False)
    except _OutOfBudget:
        stopped = True
    finally:
        tt.run_steps = original
    steps = sum(n for n, _ in chunks)
    seconds = sum(s for _, s in chunks)
    steady = chunks[1:]
    schedule = tt.plan_schedule(cfg.train, cfg.objective.warmup_steps, len(data.subset("train")))
    record(
        "train_speed",
        preset=args.preset,
        device=device,
        amp=args.amp,
        threads=cfg.train.threads or torch.get_num_threads(),
        batch=schedule.batch_size,
        hidden_dim=cfg.model.hidden_dim,
        steps=steps,
        seconds=round(seconds, 3),
        steps_per_s=round(steps / seconds, 2) if seconds else None,
        first_chunk={"steps": chunks[0][0], "seconds": round(chunks[0][1], 3)} if chunks else None,
        steady_steps_per_s=round(sum(n for n, _ in steady) / sum(s for _, s in steady), 2) if steady else None,
        stopped_by_budget=stopped,
        budget_s=args.budget_s,
        wall_s=round(time.perf_counter() - started, 1),
        gpu=torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine(),
    )


# --- embedder: CUDA vs CPU --------------------------------------------------------------------------


def _throughput(embedder, modality: str, x: np.ndarray, batch: int, min_s: float, max_calls: int) -> dict:
    rows = x[:batch] if len(x) >= batch else np.resize(x, (batch, x.shape[1]))
    for _ in range(3):  # warm-up: CUDA kernels, arenas
        embedder.embed(modality, rows)
    calls, t0 = 0, time.perf_counter()
    latencies = []
    while calls < max_calls and (time.perf_counter() - t0 < min_s or calls < 3):
        t = time.perf_counter()
        embedder.embed(modality, rows)
        latencies.append(time.perf_counter() - t)
        calls += 1
    seconds = time.perf_counter() - t0
    return {"batch": batch, "calls": calls, "rows_per_s": round(calls * batch / seconds, 1), "p50_ms": round(1000 * float(np.median(latencies)), 3)}


def cmd_embed(args) -> None:
    import onnxruntime as ort

    from avdata.features import load_features
    from index.embedder import Embedder, ModelError

    data = load_features(args.data)
    n = args.rows
    xs = {"audio": np.asarray(data.audio[:n], dtype=np.float32), "visual": np.asarray(data.visual[:n], dtype=np.float32)}
    variants = [("cpu_1thread", "cpu", 1), ("cpu_all_threads", "cpu", 0)]
    if _ort_cuda():
        variants.insert(0, ("cuda", "cuda", 0))
    else:
        try:
            Embedder(args.model, device="cuda")
            cuda_error = "no error?"
        except ModelError as err:
            cuda_error = str(err)
        record("embed", skipped_cuda=f"ONNX Runtime has no CUDAExecutionProvider ({ort.get_available_providers()}); CPU only. Embedder(device='cuda') said: {cuda_error}")
    embedders, outputs = {}, {}
    for name, device, threads in variants:
        t0 = time.perf_counter()
        try:
            emb = Embedder(args.model, device=device, intra_op_threads=threads)
        except Exception as err:  # noqa: BLE001 - recorded; the other variants still run
            record("embed_providers", variant=name, device=device, error=f"{type(err).__name__}: {err}")
            continue
        load_s = time.perf_counter() - t0
        embedders[name] = emb
        outputs[name] = {m: np.concatenate([emb.embed(m, xs[m][i : i + 1024]) for i in range(0, len(xs[m]), 1024)]) for m in xs}
        record("embed_providers", variant=name, device=device, intra_op_threads=threads, providers=emb.providers,
               session_providers={m: s.get_providers() for m, s in emb.sessions.items()}, load_s=round(load_s, 3))
    ref = "cpu_1thread"
    for name in outputs:
        if name == ref:
            continue
        diffs = {m: float(np.abs(outputs[name][m] - outputs[ref][m]).max()) for m in xs}
        cos = {m: float((outputs[name][m] * outputs[ref][m]).sum(axis=1).min()) for m in xs}
        # the same ranking? top-10 of the first 100 audio queries against the visual gallery
        top = {}
        for variant in (name, ref):
            scores = outputs[variant]["audio"][:100] @ outputs[variant]["visual"].T
            top[variant] = np.argsort(-scores, axis=1)[:, :10]
        same_top10 = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top[name], top[ref])]))
        record("embed_diff", variant=name, against=ref, rows=n, max_abs_diff=diffs, min_cosine=cos, top10_overlap_audio_to_visual=same_top10)
    for name, emb in embedders.items():
        for m in ("audio", "visual"):
            for batch in (1, 64, 4096):
                fig = _throughput(emb, m, xs[m], batch, args.min_s, 2000 if batch == 1 else 500)
                record("embed_speed", variant=name, modality=m, provider=emb.providers[m], **fig)


# --- service ----------------------------------------------------------------------------------------


def _wait_ready(base: str, proc, timeout: float) -> str | None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return f"server exited with {proc.returncode}"
        try:
            r = httpx.get(base + "/readyz", timeout=2)
            if r.status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return f"not ready after {timeout} s"


def _latency(base: str, body: dict, n: int, clients: int) -> dict:
    import concurrent.futures

    import httpx

    per = max(1, n // clients)

    def one_client(_):
        times, errors = [], 0
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(per):
                t = time.perf_counter()
                r = c.post("/v1/search", json=body)
                times.append(time.perf_counter() - t)
                errors += r.status_code != 200
        return times, errors

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - t0
    times = np.array([t for p, _ in parts for t in p]) * 1000
    return {"clients": clients, "requests": len(times), "errors": sum(e for _, e in parts), "searches_per_s": round(len(times) / wall, 1),
            "p50_ms": round(float(np.percentile(times, 50)), 2), "p90_ms": round(float(np.percentile(times, 90)), 2),
            "p99_ms": round(float(np.percentile(times, 99)), 2), "max_ms": round(float(times.max()), 2)}


def cmd_service(args) -> None:
    import httpx

    from avdata.features import load_features

    device = args.device
    note = None
    if device == "cuda" and not _ort_cuda():
        note = "ONNX Runtime has no CUDAExecutionProvider here: served with AVSEARCH_DEVICE=auto (CPU fallback) instead of cuda"
        device = "auto"
    port = args.port
    env = {**os.environ, "AVSEARCH_DEVICE": device, "AVSEARCH_WORKERS": str(args.workers), "AVSEARCH_WAL_FSYNC": "never"}
    log_path = OUT / f"service_{args.device}_w{args.workers}.log"
    cmd = [sys.executable, "-m", "service", "serve", "--model", str(args.model), "--index", str(args.index), "--port", str(port)]
    print("$", f"AVSEARCH_DEVICE={device} AVSEARCH_WORKERS={args.workers}", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    fig: dict = {"device_asked": args.device, "device_env": device, "workers": args.workers, "note": note}
    try:
        base = f"http://127.0.0.1:{port}"
        error = _wait_ready(base, proc, args.ready_timeout)
        fig["ready_s"] = round(time.time() - t0, 1)
        if error:
            fig["error"] = error
            return
        info = httpx.get(base + "/v1/info", timeout=10).json()
        fig["info_providers"] = info.get("providers")
        fig["info_search_device"] = {m: card.get("search_device") for m, card in httpx.get(base + "/v1/indexes", timeout=10).json().items()}
        data = load_features(args.data)
        queries = np.asarray(data.audio[:64], dtype=np.float32)
        body = {"modality": "audio", "vectors": queries[:1].tolist(), "top_k": 10}
        r = httpx.post(base + "/v1/search", json=body, timeout=30)
        fig["search_status"] = r.status_code
        fig["search_first_hits"] = [h["id"] for h in r.json()["results"][0][:3]] if r.status_code == 200 else r.text[:300]
        # served embeddings equal the in-process CPU embedder's?
        r = httpx.post(base + "/v1/embed", json={"modality": "audio", "vectors": queries[:8].tolist()}, timeout=30)
        if r.status_code == 200:
            from index.embedder import Embedder

            served = np.asarray(r.json()["embeddings"], dtype=np.float32)
            local = Embedder(args.model, device="cpu").embed("audio", queries[:8])
            fig["served_vs_cpu_max_abs_diff"] = float(np.abs(served - local).max())
        else:
            fig["embed_status"] = r.status_code
        workers, statuses = {}, []
        for _ in range(args.health_probes):  # a new connection each: SO_REUSEPORT spreads connections over the workers
            h = httpx.get(base + "/healthz", timeout=10, headers={"Connection": "close"})
            statuses.append(h.status_code)
            w = h.headers.get("x-avsearch-worker", "-")
            workers[w] = workers.get(w, 0) + 1
        fig["healthz_workers"] = workers
        # one search per new connection too, to make every worker embed (its own CUDA session after the fork)
        per_worker_search, per_worker_providers = {}, {}
        for _ in range(args.health_probes):
            with httpx.Client(base_url=base, timeout=30) as c:
                w = c.get("/healthz").headers.get("x-avsearch-worker", "-")
                s = c.post("/v1/search", json=body).status_code
                per_worker_search.setdefault(w, []).append(s)
                per_worker_providers[w] = c.get("/v1/info").json().get("providers")
        fig["search_status_by_worker"] = {w: sorted(set(s)) for w, s in per_worker_search.items()}
        fig["providers_by_worker"] = per_worker_providers
        fig["latency_sequential"] = _latency(base, body, args.requests, 1)
        fig["latency_concurrent"] = _latency(base, body, args.requests, args.clients)
        batch_body = {"modality": "audio", "vectors": queries.tolist(), "top_k": 10}
        fig["latency_batch64"] = _latency(base, batch_body, max(20, args.requests // 5), 1)
        info = httpx.get(base + "/v1/info", timeout=10).json()
        fig["info_providers_after"] = info.get("providers")
    except Exception as err:  # noqa: BLE001 - recorded
        fig["error"] = f"{type(err).__name__}: {err}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except Exception:  # noqa: BLE001
            os.killpg(proc.pid, signal.SIGKILL)
        fig["exit_code"] = proc.returncode
        tail = log_path.read_text(errors="replace").splitlines()
        fig["log_tail"] = tail[-25:]
        fig["log_errors"] = [line for line in tail if any(w in line for w in ("Error", "error", "Traceback", "CUDA failure", "failed"))][:20]
        record("service", **fig)


# --- report -----------------------------------------------------------------------------------------


def _table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def cmd_report(args) -> None:
    path = OUT / "figures.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    by = lambda kind: [e for e in entries if e["kind"] == kind]  # noqa: E731
    parts = ["# GPU check figures (generated by bench/gpu_check.py report)", ""]
    for e in by("env"):
        parts += ["## Environment", "```", json.dumps({k: v for k, v in e.items() if k not in ("kind", "onnxruntime_build")}, indent=1), "```", ""]
    if by("train_speed"):
        parts += ["## Training steps/s (training.train.train, timed inside run_steps)", "",
                  _table(by("train_speed"), ["preset", "device", "amp", "threads", "batch", "hidden_dim", "steps", "seconds", "steps_per_s", "steady_steps_per_s", "first_chunk", "stopped_by_budget", "skipped"]), ""]
    if by("embed_providers"):
        parts += ["## Embedder sessions", "", _table(by("embed_providers"), ["variant", "device", "intra_op_threads", "providers", "session_providers", "load_s", "error"]), ""]
    for e in by("embed"):
        parts += [f"Embedder note: {e.get('skipped_cuda')}", ""]
    if by("embed_diff"):
        parts += ["## Embeddings: difference against the 1-thread CPU session", "", _table(by("embed_diff"), ["variant", "against", "rows", "max_abs_diff", "min_cosine", "top10_overlap_audio_to_visual"]), ""]
    if by("embed_speed"):
        parts += ["## Embedder throughput (Embedder.embed: validation + session.run + finiteness check)", "",
                  _table(by("embed_speed"), ["variant", "modality", "provider", "batch", "calls", "rows_per_s", "p50_ms"]), ""]
    for e in by("service"):
        parts += [f"## Service: AVSEARCH_DEVICE={e.get('device_env')} (asked {e.get('device_asked')}), AVSEARCH_WORKERS={e.get('workers')}", ""]
        for k in ("note", "error", "ready_s", "info_providers", "info_search_device", "info_providers_after", "search_status", "search_first_hits", "served_vs_cpu_max_abs_diff",
                  "healthz_workers", "search_status_by_worker", "providers_by_worker", "exit_code"):
            if e.get(k) is not None:
                parts.append(f"- {k}: {e[k]}")
        lat = [dict(phase=p, **e[p]) for p in ("latency_sequential", "latency_concurrent", "latency_batch64") if isinstance(e.get(p), dict)]
        if lat:
            parts += ["", _table(lat, ["phase", "clients", "requests", "errors", "searches_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms"])]
        if e.get("log_errors"):
            parts += ["", "log lines with errors:", "```", *e["log_errors"], "```"]
        parts.append("")
    (OUT / "gpu_check.md").write_text("\n".join(parts))
    print("\n".join(parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    c = sub.add_parser("config")
    for q in (c, t := sub.add_parser("train-speed")):
        q.add_argument("--preset", default="default")
        q.add_argument("--device", default="cuda")
        q.add_argument("--steps", type=int, default=200)
        q.add_argument("--amp", action="store_true")
        q.add_argument("--threads", type=int, default=None)
    c.add_argument("--eval-every", type=int, default=100)
    c.add_argument("--out", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--chunk", type=int, default=50, help="steps between evaluations (each chunk timed)")
    t.add_argument("--budget-s", type=float, default=30.0, help="stop after the chunk that passes this")
    e = sub.add_parser("embed")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--rows", type=int, default=4096)
    e.add_argument("--min-s", type=float, default=1.0)
    s = sub.add_parser("service")
    s.add_argument("--model", required=True)
    s.add_argument("--index", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--requests", type=int, default=300)
    s.add_argument("--clients", type=int, default=8)
    s.add_argument("--health-probes", type=int, default=12)
    s.add_argument("--ready-timeout", type=float, default=45)
    sub.add_parser("report")
    args = p.parse_args()
    {"env": cmd_env, "config": cmd_config, "train-speed": cmd_train_speed, "embed": cmd_embed, "service": cmd_service, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
