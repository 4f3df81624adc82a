"""What the store reports as it works, for whoever counts it (the service's Prometheus ``Metrics``)."""

from __future__ import annotations


class StoreEvents:
    """The default ignores every event; a subclass (or any object with these methods) records them."""

    def committed(self, modality: str, changes: int) -> None:
        """One group commit: ``changes`` appended with one write (and one fsync)."""

    def checkpointed(self, modality: str, seconds: float, log_bytes: int, failed: bool) -> None:
        """One checkpoint of ``log_bytes`` of log, done or failed (the public metrics call it a fold)."""
