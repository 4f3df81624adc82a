"""The durable collection: model version, change log, checkpoints, snapshot files, version carry-over."""
