"""The naive baseline of bench/http_bench.py: what a first FastAPI version of the service would be.

PyTorch eager encoders (the trained checkpoint's towers + test-time CCA, the same function the ONNX
graph computes), one request at a time (no batching: FastAPI runs each sync handler in its thread
pool; one torch and one BLAS thread), numpy brute force over the gallery (matrix-vector product, argpartition, sort of the top k),
pydantic request/response models.

    python bench/naive_server.py --run RUN_DIR --gallery GALLERY_DIR --port 8001
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import uvicorn
from threadpoolctl import threadpool_limits
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.export import serving_encoders  # noqa: E402
from training.train import load_checkpoint  # noqa: E402


class Query(BaseModel):
    modality: str
    vectors: list[list[float]]
    top_k: int = 10


class Hit(BaseModel):
    id: str
    score: float


class Answer(BaseModel):
    results: list[list[Hit]]


def create_app(run_dir: Path, gallery_dir: Path) -> FastAPI:
    # One torch and one BLAS thread: with their defaults (2 each, under FastAPI's 40-thread pool) this
    # baseline measured 4x to 60x slower on 2 cores; the comparison is with a sensibly configured naive server.
    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    cfg, model, cca, _, _ = load_checkpoint(run_dir)
    encoders = serving_encoders(model, cca if cfg.cca.enabled else None)
    gallery = {m: np.load(gallery_dir / f"{m}_embeddings.npy") for m in ("audio", "visual")}
    ids = (gallery_dir / "ids.txt").read_text().split("\n")
    other = {"audio": "visual", "visual": "audio"}
    app = FastAPI()

    @app.post("/v1/search", response_model=Answer)
    def search(query: Query) -> Answer:
        if query.modality not in encoders:
            raise HTTPException(422, "unknown modality")
        with torch.no_grad():
            embedded = encoders[query.modality](torch.tensor(query.vectors, dtype=torch.float32)).numpy()
        scores = embedded @ gallery[other[query.modality]].T  # (Q, N)
        results = []
        for row in scores:
            top = np.argpartition(-row, query.top_k)[: query.top_k]
            top = top[np.argsort(-row[top])]
            results.append([Hit(id=ids[j], score=float(row[j])) for j in top])
        return Answer(results=results)

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--gallery", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.run, args.gallery), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
