"""The durable collection: model version, change log, checkpoints, snapshot files, version carry-over.

No web framework here, and nothing of ``service``: the store raises plain errors (:mod:`store.errors`)
and the service gives them HTTP statuses. See store/README.md.
"""
