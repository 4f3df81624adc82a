"""The configured index path names what is served, also after a reload to another directory.

``POST /v1/admin/reload {"index_dir": B}`` swaps B in. For the next SIGHUP, console reload, restart
or ``prepare`` to find B (and the writes acknowledged on it) rather than the configured path's old
content, the configured path must lead to B:

* a symlink (what ``prepare`` makes) or a path that does not exist yet: it is pointed at B,
  atomically, as ``prepare`` does; everything that reads the path follows;
* a real directory A: it cannot be re-pointed without moving data, so A gets a note
  (``moved.json``: where the index went). A start-up or a ``prepare`` on A is refused while the note
  is there, naming B; a reload that names A again removes it (serving A is then a choice).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from avdata.atomic import atomic_write, fsync_dir
from index.store import IndexLoadError
from store.layout import MOVED_NAME, pointer



def point_link(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` (relative when they are side by side), atomically:
    readers see the old target or the new one."""
    link, target = Path(link).absolute(), Path(target).absolute()
    made = pointer(link)
    made.unlink(missing_ok=True)
    os.symlink(target.name if target.parent.resolve() == link.parent.resolve() else target, made)
    os.replace(made, link)
    fsync_dir(link.parent)


def follow(configured: Path, served: Path) -> Path:
    """Make the configured index path lead to ``served`` (a resolved directory just swapped in);
    returns the path that a reload without paths loads from now on."""
    configured = Path(configured).absolute()
    if configured.is_symlink() or not configured.exists():
        if configured.resolve() != served:
            point_link(configured, served)
        return configured
    if configured.resolve() == served:  # back to the configured directory
        (configured / MOVED_NAME).unlink(missing_ok=True)
        return configured
    atomic_write(configured / MOVED_NAME, json.dumps({"index_dir": str(served), "at": round(time.time(), 3)}).encode())
    return served


def check_not_moved(index_dir: Path) -> None:
    """IndexLoadError when a reload moved the served index away from ``index_dir``: serving it would
    drop every change acknowledged since, without a word."""
    note = Path(index_dir) / MOVED_NAME
    try:
        moved = json.loads(note.read_text())["index_dir"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IndexLoadError(f"{note}: unreadable ({err}); it says a reload moved the served index elsewhere: delete it to serve {index_dir}") from None
    raise IndexLoadError(
        f"{index_dir}: a reload moved the served index to {moved}, which holds the changes acknowledged since; "
        f"serve that one (AVSEARCH_INDEX_DIR={moved}), or delete {note} to serve {index_dir} without them"
    )
