"""Command line: ``python -m avdata {inspect,convert} PATH ...``.

``inspect`` says what the detection rule found at PATH (format, shards, clips, widths and dtypes,
labels, ids, splits, metadata, bad records) in one screen; ``convert`` writes it as a feature
directory (``--8bit``: uint8 codes, a quarter of the memory). PATH is any collection of the data
layer: a feature directory, ``.npy`` shards, HDF5, TFRecord or Parquet/Arrow shards (a folder, a
file or a quoted glob). Bad input ends with exit code 2 and one ``error: ...`` line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from avdata.atomic import current_umask
from avdata.clips import OPTIONS_FILE, POOLINGS
from avdata.collection import RECORD_KINDS, detect, join_clips, open_collection
from avdata.features import load_features, save_directory
from avdata.paired import YOUTUBE8M, DataError, PairedFeatures
from avdata.tfrecord import is_gzip


def _overrides(args) -> dict:
    """Read options given on the command line (the rest come from avdata.json or the defaults)."""
    out = {"audio": args.audio, "visual": args.visual, "pooling": args.pooling, "range": args.range}
    if args.skip_bad:
        out["skip_bad"] = True
    return {k: v for k, v in out.items() if v is not None}


def _load(args) -> tuple[PairedFeatures, str, list[str], dict]:
    """(data, a line on the format, bad-record messages, where each field came from)."""
    kind, shards = detect(args.path)
    collection = open_collection(args.path, **_overrides(args)) if kind in RECORD_KINDS else None
    if collection is None:
        data = load_features(args.path)
        return data, kind, [], {}
    parts = collection.read_all(args.processes)
    data, bad = join_clips(collection, parts)
    gz = sum(map(is_gzip, shards))
    opts = collection.options
    line = f"{kind}, {len(shards)} shards" + (f" ({gz} gzip)" if gz else "")
    line += f"; pooling {opts.pooling}, 8-bit range [{opts.quantization.low:g}, {opts.quantization.high:g}]"
    line += f"; options: {OPTIONS_FILE} " + ("found" if collection.options_file and collection.options_file.is_file() else "absent (defaults)")
    fields = next((p.fields for p in parts if p.fields), {})
    return data, line, bad, fields


def _inspect(args) -> list[str]:
    data, line, bad, fields = _load(args)
    lines = [f"collection: {args.path}", f"format:     {line}", f"clips:      {len(data)}"]
    for modality in ("audio", "visual"):
        array = getattr(data, modality)
        lines.append(f"{modality + ':':11s} {array.shape[1]}-d {array.dtype}" + (f" from {fields[modality]}" if modality in fields else ""))
    if data.labels is None:
        lines.append("labels:     none")
    elif data.labels.ndim == 1:
        lines.append(f"labels:     class ids, {len(np.unique(data.labels))} classes")
    else:
        per_clip = data.labels.sum(1)
        lines.append(f"labels:     multi-hot, {data.labels.shape[1]} classes, {per_clip.mean():.2f} per clip ({int((per_clip == 0).sum())} clips with none)")
    lines.append(f"ids:        {', '.join(data.ids[:3])}{' ...' if len(data) > 3 else ''} (unique" + (f"; from {fields['id']})" if "id" in fields else ")"))
    counts = Counter(data.split.tolist())
    lines.append("splits:     " + ", ".join(f"{s} {counts.get(s, 0)}" for s in ("train", "val", "test")))
    if data.metadata is not None:
        keys = Counter(k for m in data.metadata if m for k in m)
        lines.append("metadata:   " + (", ".join(f"{k} ({n})" for k, n in keys.most_common(12)) or "none") + " (kept with each item)")
    else:
        lines.append("metadata:   " + ("label (from labels)" if data.labels is not None else "none"))
    lines.append(f"bad:        {len(bad)} records/shards skipped" + (f"; first: {bad[0]}" if bad else ""))
    return lines


def _convert(args) -> list[str]:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty; convert writes a new feature directory")
    data, line, bad, _ = _load(args)
    clipped = 0
    if args.eight_bit:
        clipped = int(sum(((x < YOUTUBE8M.low) | (x > YOUTUBE8M.high)).sum() for x in (data.audio, data.visual)))
        data.audio, data.visual = YOUTUBE8M.quantize(data.audio), YOUTUBE8M.quantize(data.visual)
    # Written in a temporary directory beside OUT, then renamed into place: never half a directory.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_directory(data, staging)
        os.chmod(staging, 0o777 & ~_umask())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    lines = [f"wrote {len(data)} clips ({data.audio_dim}-d audio, {data.visual_dim}-d visual, {data.audio.dtype}) from {line} to {out}"]
    if args.eight_bit:
        lines.append(f"8-bit: YouTube-8M's range [-2, 2]; {clipped} values outside it clipped")
    if bad:
        lines.append(f"skipped {len(bad)} bad records/shards; first: {bad[0]}")
    return lines


def _umask() -> int:
    return current_umask()


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH, e.g. -2,2") from None
    return low, high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avdata", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("inspect", _inspect, "say what PATH holds, in one screen"), ("convert", _convert, "write PATH as a feature directory")):
        p = sub.add_parser(name, help=text)
        p.add_argument("path", help="feature directory, .npy shards, HDF5, TFRecord or Parquet/Arrow shards (folder, file or quoted glob)")
        p.add_argument("--audio", default=None, help="audio feature/column name (default: mean_audio, audio, audio_embedding, audio_features)")
        p.add_argument("--visual", default=None, help="visual feature/column name (default: mean_rgb, rgb, visual, visual_features, video_embedding)")
        p.add_argument("--pooling", default=None, choices=POOLINGS, help="per-second features -> clip (default mean, YouTube-8M's video level)")
        p.add_argument("--range", default=None, type=_range, metavar="LOW,HIGH", help="range of 8-bit values (default -2,2: YouTube-8M, AudioSet)")
        p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
        p.add_argument("--processes", type=int, default=None, help="reader processes (default: one per core)")
        if name == "convert":
            p.add_argument("--out", required=True, help="new feature directory")
            p.add_argument("--8bit", dest="eight_bit", action="store_true", help="store uint8 codes (YouTube-8M's rule): a quarter of float32's memory")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        print("\n".join(args.func(args)))
    except (DataError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
