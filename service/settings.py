"""Service settings, from environment variables prefixed ``AVSEARCH_`` (every one is listed in service/README.md)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from store.config import StoreConfig
from store.sharedlog import FOLLOW_EVERY_S


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AVSEARCH_", protected_namespaces=())

    model_dir: Path = Field(Path("artifacts/model"), description="exported model directory (manifest.json + ONNX files)")
    index_dir: Path = Field(Path("artifacts/index"), description="index directory with audio/ and visual/; item changes are saved here")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="ONNX Runtime device; auto = CUDA when present")
    max_vectors: int = Field(1024, gt=0, description="most vectors (or ids, or items) in one request; more: HTTP 413")
    max_top_k: int = Field(1000, gt=0, description="largest top_k accepted; more: HTTP 422")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="largest request body in bytes; more: HTTP 413 (a JSON body is also bounded by what max_vectors rows of the model's widths can need)")
    max_hits: int = Field(100_000, gt=0, description="most hits one search may ask for (queries x top_k); more: HTTP 413")
    max_metadata_bytes: int = Field(64 * 1024, gt=0, description="largest metadata of one item, in bytes of compact JSON; more: HTTP 422")
    api_key: SecretStr | None = Field(None, description="read-write API key (Authorization: Bearer <key>); unset = no auth")
    read_api_key: SecretStr | None = Field(None, description="read-only API key: search, embed, get items, info; needs api_key set")
    batch_window_ms: float = Field(0.2, ge=0, le=100, description="under concurrent load, how long a batch waits for more requests (0: only those queued while the previous batch ran)")
    max_batch: int = Field(256, gt=0, description="most query vectors the micro-batcher runs in one encoder+index call")
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads per encoder call (0 = one per core)")
    workers: int = Field(1, ge=1, le=512, description="processes serving one collection on one port (`serve`): the index is loaded once and shared; folds, snapshot files and swaps run in the primary, which serves too. 1 on a 1-2 core machine; about one per core beyond (see service/README.md)")
    follow_seconds: float = Field(FOLLOW_EVERY_S, gt=0, description="with workers > 1: how often each process applies, in the background while a core would otherwise idle, the changes the other processes logged (a read applies what is still missing itself; when no core idles for that long, a process more than 256 changes behind applies at nice 10 down to 256). Longer: less background work while writes stream in, more left for the next request on another process and for the next checkpoint (on a 2-core machine no better for write latency: bench/results/write_workers_ab_nofollow.md)")
    search_threads: int = Field(1, ge=0, description="FAISS OpenMP and numpy BLAS threads of `serve` (0 = their defaults, one per core)")
    report_dir: Path | None = Field(None, description="training report folder (python -m training compare --out) whose plots the console shows; unset = none")
    access_log: bool = Field(False, description="uvicorn access log (the Prometheus metrics count every request anyway)")
    host: str = Field("127.0.0.1", description="address `serve` binds (--host overrides); off loopback, writes need a key unless allow_anonymous_writes")
    allowed_hosts: str | None = Field(None, description="Host header values (names or addresses, ',' separated, '*' = any) the server answers; unset = the loopback names when bound to loopback (no DNS rebinding onto a keyless server), any otherwise; others: HTTP 421")
    header_timeout: float = Field(10.0, gt=0, description="seconds a connection may take to send a request's head (from connecting, or after its previous answer's keep-alive); then it is closed")
    body_timeout: float = Field(60.0, gt=0, description="seconds a request may take to send its body once its head is in; then it is closed")
    max_connections: int = Field(1000, gt=0, description="open connections and requests uvicorn serves at once; more: HTTP 503 (a reverse proxy in front should queue instead)")
    allow_anonymous_writes: bool = Field(False, description="let anyone who reaches a non-loopback address write, delete and reload when no API key is set")
    reload_roots: str | None = Field(None, description="directories (separated by ':') under which /v1/admin/reload may load a version; unset = the parents of model_dir and index_dir (never '/': a directory at the top is its own root)")
    max_drain_bytes: int = Field(256 * 1024 * 1024, ge=0, description="of an over-limit body, how much is read and dropped so the client (which may send it all before reading) gets its 413")

    wal_fsync: str = Field("always", pattern="^(always|never)$", description="always: an item change is fsynced in the write-ahead log before its answer (group commit); never: written to the OS before its answer (a killed process loses nothing, a power cut may lose the last changes)")
    wal_snapshot_bytes: int = Field(64 * 1024 * 1024, gt=0, description="fold a modality's write-ahead log into a snapshot once it holds this many bytes")
    wal_snapshot_seconds: float = Field(300.0, gt=0, description="...or once its oldest change not in a snapshot is this old")
    wal_snapshot_growth: float = Field(1.0, ge=0, description="...and the log holds this fraction of the last snapshot's bytes (a fold rewrites the whole index: amortised O(1) a change)")
    wal_fold_fork: bool = Field(True, description="a fold writes the snapshot from a forked child's copy-on-write image (commits wait ~0.1 s for the fork) instead of a copy in memory (commits wait for the copy: 5 s at 10^7 HNSW32 items); Linux only")
    wal_fold_timeout: float = Field(3600.0, gt=0, description="a forked snapshot writer still writing after this many seconds is stopped: the fold (or backup) fails, the log keeps every change, and the next fold retries")
    write_headroom: float = Field(0.25, ge=0, description="room made at load for this fraction more items, so the first write after a start does not copy the whole index (10 s at 10^7 HNSW32 items); 0: none (a read-only service saves the memory and the load time)")

    keep_versions: int = Field(3, ge=1, description="python -m service prepare keeps this many <index>-<version> directories (the live one and the new one always)")
    snapshot_dir: Path | None = Field(None, description="where POST /v1/admin/snapshots writes snapshot files; unset = <parent of index_dir>/snapshots")

    def snapshot_directory(self) -> Path:
        return self.snapshot_dir if self.snapshot_dir is not None else Path(self.index_dir).absolute().parent / "snapshots"

    def store_config(self) -> StoreConfig:
        """The store's durability and checkpoint policy (the AVSEARCH_WAL_* names are public: they stay)."""
        return StoreConfig(
            fsync=self.wal_fsync == "always",
            checkpoint_bytes=self.wal_snapshot_bytes,
            checkpoint_seconds=self.wal_snapshot_seconds,
            checkpoint_growth=self.wal_snapshot_growth,
            fork=self.wal_fold_fork,
            checkpoint_timeout=self.wal_fold_timeout,
            write_headroom=self.write_headroom,
        )

    def reload_root_paths(self) -> list[Path]:
        """Resolved directories a reload may name; symlinks resolved so none can point out of them."""
        if self.reload_roots:
            roots = [Path(part) for part in self.reload_roots.split(":") if part.strip()]
        else:  # the parents, unless that is '/' (a model in /model): then the directory alone, never the whole disk
            roots = [path.parent if path.parent != Path(path.anchor) else path for path in (Path(self.model_dir).absolute(), Path(self.index_dir).absolute())]
        return list(dict.fromkeys(root.resolve() for root in roots))

    def allowed_host_names(self) -> set[str] | None:
        """Host names (no port, lower case) requests may name; None: any."""
        if self.allowed_hosts is not None:
            names = {part.strip().lower() for part in self.allowed_hosts.split(",") if part.strip()}
            return None if "*" in names else names
        return set(LOOPBACK_NAMES) | {self.host.strip("[]").lower()} if is_loopback(self.host) else None

    def anonymous_writes_refused(self) -> bool:
        """No key, bound off loopback, and not explicitly allowed: writes and admin routes answer 403."""
        return self.api_key is None and not self.allow_anonymous_writes and not is_loopback(self.host)

    @field_validator("api_key", "read_api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        if value == "":
            return None  # AVSEARCH_API_KEY= (as compose passes an unset variable) means no key
        return value.strip() if isinstance(value, str) else value  # a key file's trailing newline would never match

    @model_validator(mode="after")
    def _keys_are_coherent(self) -> "Settings":
        if self.read_api_key is not None and self.api_key is None:
            raise ValueError("AVSEARCH_READ_API_KEY is set but AVSEARCH_API_KEY is not: writes would be open to anyone; set both")
        if self.api_key is not None and self.read_api_key is not None and self.api_key.get_secret_value() == self.read_api_key.get_secret_value():
            raise ValueError("AVSEARCH_API_KEY and AVSEARCH_READ_API_KEY must differ")
        for name in ("api_key", "read_api_key"):
            key = getattr(self, name)
            if key is not None and not key.get_secret_value().strip():
                raise ValueError(f"AVSEARCH_{name.upper()} is blank; unset it or give a key")
        return self


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; anything else (0.0.0.0 and :: included) is reachable from elsewhere."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
