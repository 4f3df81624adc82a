"""Parquet and Arrow tables: one row a clip, read through pyarrow.

The two feature vectors are list, large-list or fixed-size-list columns of floats (or of uint8
codes, de-quantised), or binary columns of 8-bit codes; the names are :class:`ReadOptions`'
candidates (``audio``/``visual``, ``mean_audio``/``mean_rgb`` ...). The id column is the first of
``options.ids`` present (with the start second when there is one); a ``labels`` list column is
optional; every other column (title, URL, start second ...) is kept as item metadata. One file is
one shard.

**clip-retrieval's layout** (``<modality>_emb/<modality>_emb_<k>.npy`` embedding shards beside
``metadata/metadata_<k>.parquet``, row k of one the row k of the other): shard k is the metadata
file; the audio folder is ``audio_emb``, the visual one the first of ``visual_emb``, ``img_emb``,
``video_emb`` (or ``<name>_emb`` for a feature name given in the options).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from avdata.clips import MODALITIES, ReadOptions, ShardClips
from avdata.paired import DataError

__all__ = ["TABLE_SUFFIXES", "read_table_shard", "embedding_folders", "embedding_shards", "read_embedding_shard"]

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")


def _read(path: Path):
    import pyarrow as pa
    import pyarrow.feather
    import pyarrow.parquet

    try:
        if path.suffix.lower() == ".parquet":
            return pyarrow.parquet.read_table(path)
        return pyarrow.feather.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable {'Parquet' if path.suffix.lower() == '.parquet' else 'Arrow'} file ({err})") from None


def _matrix(column, name: str, path: Path, options: ReadOptions) -> np.ndarray:
    """A list / fixed-size-list / binary column as (n, D) float32; a row of another width is an error naming it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    if column.null_count:
        raise DataError(f"{path}: column {name!r} row {int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])}: no vector (null)")
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        lengths = pc.binary_length(column).to_numpy()
        values = np.frombuffer(b"".join(column.to_pylist()), np.uint8) if n else np.zeros(0, np.uint8)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        values = column.flatten()
        if values.null_count:
            raise DataError(f"{path}: column {name!r} holds null values inside a vector")
        value_type = values.type
        if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
            raise DataError(f"{path}: column {name!r} holds {value_type} values; expected floats or uint8 codes")
        values = values.to_numpy(zero_copy_only=False)
    else:
        raise DataError(f"{path}: column {name!r} is {kind}; expected a list of floats (or uint8 codes), or 8-bit bytes")
    if n == 0:
        return np.zeros((0, 0), np.float32)
    wrong = np.flatnonzero(lengths != lengths[0])
    if len(wrong):
        raise DataError(f"{path}: column {name!r} row {int(wrong[0])}: {int(lengths[wrong[0]])} values; row 0 has {int(lengths[0])}")
    matrix = values.reshape(n, int(lengths[0]))
    if matrix.dtype == np.uint8:
        return options.quantization.dequantize(matrix)
    if np.issubdtype(matrix.dtype, np.integer):
        raise DataError(f"{path}: column {name!r} holds {matrix.dtype} integers; expected floats or uint8 codes")
    matrix = matrix.astype(np.float32, copy=False)
    bad = ~np.isfinite(matrix)
    if bad.any():
        raise DataError(f"{path}: column {name!r} row {int(np.argwhere(bad)[0][0])}: holds NaN/Inf")
    return matrix


def _jsonable(value):
    """A cell as JSON: bytes as text (hex when not UTF-8), dates and decimals as their text."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def embedding_folders(root: Path, options: ReadOptions) -> dict[str, Path] | None:
    """The ``<name>_emb`` folder of each modality in clip-retrieval's layout, or None when ``root`` is not one."""
    if not (root / "metadata").is_dir():
        return None
    found = {}
    for modality, first in (("audio", ("audio",)), ("visual", ("visual", "img", "video"))):
        found[modality] = next((root / f"{n}_emb" for n in (*first, *options.names(modality)) if (root / f"{n}_emb").is_dir()), None)
    return found if all(found.values()) else None


def embedding_shards(root: Path) -> list[Path]:
    """``metadata/metadata_<k>.parquet`` in the order of k."""
    files = [p for p in (root / "metadata").glob("metadata_*.parquet") if p.stem.removeprefix("metadata_").isdigit()]
    return sorted(files, key=lambda p: int(p.stem.removeprefix("metadata_")))


def read_embedding_shard(path: str | os.PathLike, options: ReadOptions, modalities=MODALITIES) -> ShardClips:
    """Shard k of clip-retrieval's layout: the metadata table's rows with row k of each ``_emb`` shard."""
    path = Path(path)
    root, k = path.parent.parent, path.stem.removeprefix("metadata_")
    folders = embedding_folders(root, options)
    table = _read(path)
    arrays = {}
    for modality in modalities:
        file = folders[modality] / f"{folders[modality].name}_{k}.npy"
        try:
            matrix = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{file}: not a readable .npy shard ({err}); it pairs with {path}") from None
        if matrix.ndim != 2 or len(matrix) != table.num_rows:
            raise DataError(f"{file}: shape {matrix.shape}; {path} has {table.num_rows} rows, one per embedding")
        if not (np.issubdtype(matrix.dtype, np.floating) or matrix.dtype == np.uint8):
            raise DataError(f"{file}: dtype {matrix.dtype}; expected floats (clip-retrieval writes float16) or uint8 codes")
        arrays[modality] = options.quantization.dequantize(matrix) if matrix.dtype == np.uint8 else np.asarray(matrix, np.float32)
        if not np.isfinite(arrays[modality]).all():
            raise DataError(f"{file}: row {int(np.flatnonzero(~np.isfinite(arrays[modality]).all(1))[0])}: holds NaN/Inf")
    clips = _rows_as_clips(path, table, set(), options)
    clips.audio, clips.visual = arrays.get("audio"), arrays.get("visual")
    clips.fields.update({m: f"{folders[m].name}/ (.npy shards)" for m in modalities})
    return clips


def _plain(kind) -> bool:
    """Arrow types whose Python values are JSON already (no per-value conversion needed)."""
    import pyarrow as pa

    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _plain(kind.value_type)
    return any(test(kind) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_null))


def _column_ids(path: Path, table, options: ReadOptions) -> tuple[str, str | None, list[str]] | None:
    """(source, column used up or None, ids) from a whole id column (and start column), or None
    when no id column is there. Column-wise: a per-row :func:`clip_id` was most of a table's read."""
    id_name = next((n for n in options.ids if n in table.column_names), None)
    if id_name is None:
        return None
    column = table.column(id_name)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: row {row}: no id in column {id_name!r}")
    values = [v.decode() if isinstance(v, bytes) else str(v) for v in column.to_pylist()] if not _plain(column.type) else [str(v) for v in column.to_pylist()]
    if options.start not in table.column_names:
        return repr(id_name), id_name, values
    starts = [None if s is None else int(s) if float(s).is_integer() else s for s in table.column(options.start).to_pylist()]
    return f"{id_name!r}:{options.start!r}", None, [v if s is None else f"{v}:{s}" for v, s in zip(values, starts)]


def _rows_as_clips(path: Path, table, used: set[str], options: ReadOptions) -> ShardClips:
    """Ids, labels and metadata of a table's rows (its columns but ``used``); no vectors yet."""
    columns = set(table.column_names)
    found = _column_ids(path, table, options)
    id_source, id_field, ids = found if found else ("none: <file>:<row>", None, [f"{path.name}:{n}" for n in range(table.num_rows)])
    kept = table.select([c for c in table.column_names if c not in used and c != id_field])
    convert = not all(_plain(kind) for kind in kept.schema.types)
    metadata = [{k: _jsonable(v) if convert else v for k, v in row.items() if v is not None} for row in kept.to_pylist()]
    described = {"id": id_source}
    labels = None
    if options.labels in columns:
        labels = [list(m.get(options.labels) or []) for m in metadata]
        if any(not all(isinstance(x, int) for x in row) for row in labels):
            raise DataError(f"{path}: column {options.labels!r} must hold lists of integer class ids")
    return ShardClips(str(path), None, None, ids, labels, metadata, fields=described)


def read_table_shard(path: str | os.PathLike, options: ReadOptions, modalities=MODALITIES) -> ShardClips:
    """Every row of one Parquet/Arrow file as clips; the modalities not in ``modalities`` are not decoded."""
    path = Path(path)
    table = _read(path)
    columns = set(table.column_names)
    arrays, used, described = {}, set(), {}
    for modality in MODALITIES:
        name = next((c for c in options.names(modality) if c in columns), None)
        if name is None:
            raise DataError(f"{path}: no {modality} column (looked for {', '.join(options.names(modality))}; columns: {', '.join(table.column_names)})")
        used.add(name)
        described[modality] = f"{name!r} ({table.schema.field(name).type})"
        if modality in modalities:
            arrays[modality] = _matrix(table.column(name), name, path, options)
    clips = _rows_as_clips(path, table, used, options)
    clips.audio, clips.visual = arrays.get("audio"), arrays.get("visual")
    clips.fields.update(described)
    return clips
