"""Whose objects sit where a forked worker writes (``python bench/fork_copies.py --by-package``).

    python -m bench.heap_census CENSUS serve --model M --index I --port P    # `python -m service serve`, with a census

Run in place of ``python -m service``, it writes CENSUS (a pickle) just before the primary forks
its first worker: the address range of every Python object reachable from ``sys.modules`` (and of
those only the cyclic GC knows of), what it is (``str``, ``code``, a function's or class's
qualified name, or its type's name) and the top-level package whose module reaches it first (a
breadth-first walk of ``gc.get_referents`` from each module, in import order). Taking the census
allocates and frees memory before the fork: the figures describe where objects lie, not the exact
number of pages a worker copies without it (bench/fork_copies.py's other tables say that).
"""

from __future__ import annotations

import bisect
import gc
import pickle
import runpy
import sys
import types
from pathlib import Path

GC_HEADER = 16  # bytes before a GC-tracked object's address (CPython 3.11-3.13, 64-bit)


def describe(thing: object) -> str:
    kind = type(thing)
    if kind is types.FunctionType or issubclass(kind, type):  # type(), not isinstance(): a proxy's __class__ may lie
        try:
            return f"{'function' if kind is types.FunctionType else 'class'} {thing.__module__}.{thing.__qualname__}"
        except Exception:  # an extension class without a readable name
            pass
    return "code" if kind is types.CodeType else kind.__name__


def take(path: Path) -> None:
    """Every reachable object's (start, end, what, package), sorted by start, pickled to ``path``."""
    seen: dict[int, tuple] = {}
    walk: list[tuple[object, str]] = []

    def claim(thing: object, package: str) -> None:
        if id(thing) not in seen:
            header = GC_HEADER if gc.is_tracked(thing) else 0
            try:
                size = sys.getsizeof(thing)  # the GC header included
            except Exception:  # an extension type's broken __sizeof__: its header, at least
                size = header + 16
            seen[id(thing)] = (id(thing) - header, id(thing) - header + size, describe(thing), package)
            walk.append((thing, package))

    for name, module in list(sys.modules.items()):
        if module is not None:
            claim(module, name.split(".")[0])
    for thing, package in walk:  # grows while it is walked
        for referent in gc.get_referents(thing):
            claim(referent, package)
    for thing in gc.get_objects():
        claim(thing, "(reached from no module)")
    path.write_bytes(pickle.dumps(sorted(seen.values())))


class Census:
    """The census read back: which object holds an address."""

    def __init__(self, path: Path):
        self.objects = pickle.loads(path.read_bytes())
        self.starts = [o[0] for o in self.objects]

    def holder(self, address: int) -> tuple[int, int, str, str] | None:
        at = bisect.bisect_right(self.starts, address) - 1
        return self.objects[at] if at >= 0 and address < self.objects[at][1] else None


def main() -> None:
    from service.workers import Primary  # the server's modules, imported only when run as the server

    path, fork = Path(sys.argv[1]), Primary._fork_worker

    def fork_after_census(primary: Primary, slot: int) -> None:
        if not path.exists():
            take(path)
            gc.collect()
        fork(primary, slot)

    Primary._fork_worker = fork_after_census
    sys.argv = ["service", *sys.argv[2:]]
    runpy.run_module("service", run_name="__main__")


if __name__ == "__main__":
    main()
