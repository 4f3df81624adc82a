"""What the store raises, as plain exceptions: no HTTP here. The service gives each a status in
one place (``service/errors.py``); the command line prints the message."""

from __future__ import annotations


class ItemNotFound(KeyError):
    """No item with that id in that modality (a get, a delete, a search by stored ids)."""

    def __init__(self, modality: str, item_id: str):
        super().__init__(item_id)
        self.modality, self.item_id = modality, item_id
        self.message = f"no {modality} item with id {item_id!r}"

    def __reduce__(self):  # pickled whole: a worker process raises the primary's error (store.replication)
        return type(self), (self.modality, self.item_id)


class _ChangeError(RuntimeError):
    """A change of ``modality`` that went wrong for ``reason``; subclasses word the message."""

    def __init__(self, modality: str, reason: str):
        self.modality, self.reason = modality, reason
        self.message = self.wording.format(modality=modality, reason=reason)
        super().__init__(self.message)

    def __reduce__(self):  # pickled whole: a worker process raises it from the primary's answers (store.replication)
        return type(self), (self.modality, self.reason)


class ChangeNotSaved(_ChangeError):
    """A change whose log append failed; nothing of it was applied, so the client may simply retry."""

    wording = "the {modality} change was not saved ({reason}); nothing was applied, so nothing changed; retry later"


class ChangeNotDurable(_ChangeError):
    """With worker processes: a change in the log, and served by every process, whose fsync failed.
    Its records were published before the fsync (so that the processes' fsyncs overlap), so they
    cannot be taken back; a power cut may lose it, a kill does not."""

    wording = "the {modality} change is in the log and served, but the disk did not confirm it ({reason}): a power cut may lose it; send it again once the disk is fixed to be sure"


class SnapshotError(ValueError):
    """A snapshot name or file that cannot be used; the message says why."""


class SnapshotNotFound(FileNotFoundError):
    """No snapshot file of that name."""


class ChannelClosed(ConnectionError):
    """A worker process's link to the primary (store.replication) is gone: nothing can be written."""


class NotFollowing(ConnectionError):
    """A worker process that can no longer apply what the others log (store.sharedlog): it serves
    nothing more and is replaced by a fresh fork."""

    def __init__(self, modality: str, reason: str):
        self.modality, self.reason = modality, reason
        super().__init__(f"this worker can no longer follow the {modality} log ({reason})")

    def __reduce__(self):
        return type(self), (self.modality, self.reason)
