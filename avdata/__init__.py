"""avsearch's data layer: paired audio/visual clip features; numpy, pyarrow and crc32c (no torch).

* :mod:`avdata.features`: the formats (feature directory, HDF5, shard folder, ``synthetic``), loaded
  and validated, and written atomically (:mod:`avdata.atomic`);
* :mod:`avdata.collection`: the one detection rule, and collections of record or table shards read
  in parallel: :mod:`avdata.tfrecord` (framing, CRC-32C, Example/SequenceExample), :mod:`avdata.clips`
  (read options, pooling, ids, metadata), :mod:`avdata.tables` (Parquet/Arrow, clip-retrieval's layout);
* ``python -m avdata inspect|convert PATH``: what a collection holds; a feature directory of it;
* :mod:`avdata.synthetic`: the embedded default generator;
* :mod:`avdata.paired`: :class:`~avdata.paired.PairedFeatures`, the type they all produce.

``training``, ``index`` and ``service`` all import it; it imports none of them, so the API image
ships ``avdata``, ``index`` and ``service`` without ``training``.
"""
