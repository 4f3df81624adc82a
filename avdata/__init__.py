"""avsearch's data layer: paired audio/visual clip features, numpy only (no torch).

* :mod:`avdata.features`: the formats (feature directory, HDF5, shard folder, ``synthetic``), loaded
  and validated, and written atomically (:mod:`avdata.atomic`);
* :mod:`avdata.synthetic`: the embedded default generator;
* :mod:`avdata.paired`: :class:`~avdata.paired.PairedFeatures`, the type they all produce.

``training``, ``index`` and ``service`` all import it; it imports none of them, so the API image
ships ``avdata``, ``index`` and ``service`` without ``training``.
"""
