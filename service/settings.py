"""Service settings, from environment variables prefixed ``AVSEARCH_`` (see README)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AVSEARCH_", protected_namespaces=())

    model_dir: Path = Field(Path("artifacts/model"), description="exported model directory (manifest.json + ONNX files)")
    index_dir: Path = Field(Path("artifacts/index"), description="index directory with audio/ and visual/")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="ONNX Runtime device; auto = CUDA when present")
    max_vectors: int = Field(1024, gt=0, description="most query vectors in one request (more: HTTP 413)")
    max_top_k: int = Field(1000, gt=0, description="largest top_k accepted")
