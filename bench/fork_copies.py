"""Where a forked worker's private memory comes from (issue 22's memory figure, explained).

    sudo python bench/fork_copies.py                  # 10^5 Flat items per modality, 2 workers (~1 min)
    sudo python bench/fork_copies.py --items 1e6
    sudo python bench/fork_copies.py --items 1e6 --by-package   # and whose objects the copied pages hold

Starts ``python -m service serve`` with ``AVSEARCH_WORKERS=2`` (bench/write_bench.py's cached
indexes) and reads each process's private dirty memory (``/proc/PID/smaps_rollup``) once the
workers are ready, after each worker has answered one request (``/readyz``), and after
``--searches`` searches. Then, for each worker, it finds the pages the fork shared that are no longer
shared (``/proc/PID/pagemap``: the physical frame differs from the primary's; needs root) and
compares their bytes with the primary's copy, 8 bytes at a time, to say what was written on each:
- a reference count: the changed word is followed by a pointer to a type (CPython's object header);
- a cyclic-GC link: the changed word sits 16 or 8 bytes before an object header;
- other words: allocator metadata, new objects written into free blocks, and bytecode that
  CPython 3.11 specialises in place as it runs (PEP 659), in the code objects the fork shared.
Writes bench/results/fork_copies.md.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.heap_census import Census  # noqa: E402
from bench.server_tree import settled_tree, stop_tree  # noqa: E402
from bench.trained import trained_default_model  # noqa: E402
from bench.worker_memory import search_load  # noqa: E402
from bench.write_bench import build_index, serve  # noqa: E402
from index.embedder import load_manifest  # noqa: E402

PAGE = 4096
TYPE_NAME_OFFSET = 24  # PyTypeObject.tp_name, after ob_refcnt, ob_type and ob_size (64-bit)
USER_SPACE = 1 << 47
UNCHANGED = "no word differs (written and restored: a reference count taken and let go)"
NO_OBJECT = "(no Python object)"


def private_dirty_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    return 0.0


def mappings(pid: int) -> dict[tuple[int, int], str]:
    out = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(None, 5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out[(start, end)] = fields[5].strip() if len(fields) > 5 else ""
    return out


def frames(pid: int, start: int, end: int) -> list[int | None]:
    """The physical frame of each page (None: not present)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        data = f.read((end - start) // PAGE * 8)
    return [(v & ((1 << 55) - 1)) if v >> 63 else None for v in struct.unpack(f"{len(data) // 8}Q", data)]


class Memory:
    """Reads another process's memory (/proc/PID/mem)."""

    def __init__(self, pid: int):
        self.file = open(f"/proc/{pid}/mem", "rb", 0)
        self._type_names: dict[int, str | None] = {}

    def read(self, address: int, size: int) -> bytes | None:
        try:
            self.file.seek(address)
            return self.file.read(size)
        except (OSError, OverflowError, ValueError):
            return None

    def type_name(self, address: int) -> str | None:
        """The tp_name of the type object at ``address``, or None if it does not look like one."""
        if not PAGE < address < USER_SPACE:
            return None
        if address not in self._type_names:
            name = None
            raw = self.read(address + TYPE_NAME_OFFSET, 8)
            pointer = struct.unpack("Q", raw)[0] if raw else 0
            text = self.read(pointer, 64) if PAGE < pointer < USER_SPACE else None
            if text and b"\0" in text:
                text = text.split(b"\0")[0]
                if text and all(32 < c < 127 for c in text):
                    name = text.decode()
            self._type_names[address] = name
        return self._type_names[address]


def copied_pages(primary: int, worker: int) -> tuple[int, collections.Counter, collections.Counter]:
    """(pages copied, pages by mapping, pages by what changed on them) of ``worker`` against ``primary``."""
    theirs, ours = Memory(primary), Memory(worker)
    shared_before = mappings(primary)
    pages, by_mapping, kinds = 0, collections.Counter(), collections.Counter()
    for (start, end), name in mappings(worker).items():
        if (start, end) not in shared_before or name.startswith("[v"):
            continue
        for i, (a, b) in enumerate(zip(frames(primary, start, end), frames(worker, start, end))):
            if a is None or b is None or a == b:
                continue
            address = start + i * PAGE
            before, after = theirs.read(address, PAGE), ours.read(address, PAGE)
            if not before or not after:
                continue
            pages += 1
            by_mapping[name or "anonymous"] += 1
            changed = {_kind(theirs, before, offset) for offset in range(0, PAGE, 8) if before[offset : offset + 8] != after[offset : offset + 8]}
            kinds[UNCHANGED if not changed else " and ".join(sorted(changed)) if len(changed) == 1 else _mixed(changed)] += 1
    return pages, by_mapping, kinds


def common_pages(pids: list[int]) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(address, each process's frame) of every present page mapped at the same address in all of
    ``pids``: what the fork shared."""
    common = set(mappings(pids[0]))
    for pid in pids[1:]:
        common &= set(mappings(pid))
    for start, end in common:
        for i, page in enumerate(zip(*(frames(pid, start, end) for pid in pids))):
            if None not in page:
                yield start + i * PAGE, page


def copy_owners(primary: int, workers: list[int]) -> collections.Counter:
    """Pages mapped at the same address in the primary and every worker (what the fork shared), by
    which processes no longer share their frame with the others: e.g. "primary" means both workers
    still share the page and the primary copied it (2 frames where one process would need 1)."""
    pids = [primary, *workers]
    names = ["primary", *(f"worker {i + 1}" for i in range(len(workers)))]
    owners = collections.Counter()
    for _, page in common_pages(pids):
        counts = collections.Counter(page)
        alone = [name for name, frame in zip(names, page) if counts[frame] == 1]
        if len(alone) == len(pids):  # the last writer of a page keeps the original: two writers leave three frames, as three do
            owners[f"every process ({len(pids) - 1} or more of them wrote; {len(pids) - 1} pages more)"] += 1
        else:
            owners[" + ".join(alone) if alone else "nobody (still shared)"] += 1
    return owners


def written_by_package(primary: int, workers: list[int], census: Census) -> tuple[int, collections.Counter, collections.Counter]:
    """Over the pages every process holds a copy of (the fork's image written by 2 or more of
    them): (pages, pages by the package of the objects whose words differ between the copies,
    pages by what those objects are). A page shared out between several objects counts a fraction
    to each; a word that lies in no object of the census counts as "no Python object" (malloc's and
    pymalloc's bookkeeping, free blocks, objects made after the census, libpython's own data)."""
    pids = [primary, *workers]
    memories = [Memory(pid) for pid in pids]
    pages, packages, kinds = 0, collections.Counter(), collections.Counter()
    for address, page in common_pages(pids):
        if len(set(page)) < len(pids):
            continue
        copies = [memory.read(address, PAGE) for memory in memories]
        if not all(copies):
            continue
        holders = set()
        for offset in range(0, PAGE, 8):
            if len({copy[offset : offset + 8] for copy in copies}) > 1:
                holder = census.holder(address + offset)
                holders.add(holder[2:] if holder else ("", NO_OBJECT))
        pages += 1
        for what, package in holders or {("", "(no word differs now)")}:
            packages[package] += 1 / max(len(holders), 1)
            kinds[what or package] += 1 / max(len(holders), 1)
    return pages, packages, kinds


def _mixed(kinds: set[str]) -> str:
    if any(k.startswith("other") for k in kinds):
        return "other words, and reference counts or GC links"
    return "reference counts and GC links only (several types)"


def _kind(memory: Memory, page: bytes, offset: int) -> str:
    for distance, kind in ((8, "reference count"), (24, "GC link"), (16, "GC link")):
        if offset + distance + 8 <= PAGE:
            name = memory.type_name(struct.unpack("Q", page[offset + distance : offset + distance + 8])[0])
            if name:
                return f"{kind} ({'str' if name == 'str' else 'code' if name == 'code' else 'other objects'})"
    return "other words (allocator, new objects, specialised bytecode)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=float, default=1e5, help="items per modality (Flat)")
    parser.add_argument("--searches", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-http-bench"), help="shared with bench/worker_memory.py")
    parser.add_argument("--by-package", action="store_true", help="also say whose objects lie on the pages every process copied (bench/heap_census.py; results in fork_copies_by_package.md)")
    args = parser.parse_args()
    model = trained_default_model(args.work)
    manifest, _ = load_manifest(model)
    input_dims = {m: int(d) for m, d in manifest["input_dims"].items()}
    index, _ = build_index(model, args.work, int(args.items), "Flat", visual=(int(args.items), "Flat"))
    census_path = Path(tempfile.mkdtemp(prefix="avsearch-census-")) / "census.pickle" if args.by_package else None
    launcher = ("-m", "bench.heap_census", str(census_path)) if census_path else ("-m", "service")
    proc, port = serve(model, index, snapshot_seconds=300, workers=2, launcher=launcher)
    try:
        tree = settled_tree(proc.pid)
        primary, workers = tree[0], [p for p in tree[1:] if "multiprocessing" not in Path(f"/proc/{p}/cmdline").read_text()]
        readings = {"ready": {p: private_dirty_mb(p) for p in [primary, *workers]}}
        for _ in range(50):  # connections spread over the workers: each answers at least one
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz").read()
        readings["each answered /readyz"] = {p: private_dirty_mb(p) for p in [primary, *workers]}
        search_load(port, input_dims, args.searches)
        time.sleep(1)
        readings[f"after {args.searches} searches"] = {p: private_dirty_mb(p) for p in [primary, *workers]}
        analyses = {w: copied_pages(primary, w) for w in workers}
        owners = copy_owners(primary, workers)
        by_package = written_by_package(primary, workers, Census(census_path)) if census_path else None
    finally:
        stop_tree(proc)
        if census_path:
            shutil.rmtree(census_path.parent, ignore_errors=True)
    lines = [f"# A forked worker's private memory (`python bench/fork_copies.py --items {int(args.items)}{' --by-package' if args.by_package else ''}`)", "",
             f"2 workers, {int(args.items):,} Flat items per modality. Private dirty MB (`smaps_rollup`):", "",
             "| when | primary | " + " | ".join(f"worker {i + 1}" for i in range(len(workers))) + " |", "|---|---:|" + "---:|" * len(workers)]
    for when, reading in readings.items():
        lines.append(f"| {when} | {reading[primary]:.1f} | " + " | ".join(f"{reading[w]:.1f}" for w in workers) + " |")
    for i, (worker, (pages, by_mapping, kinds)) in enumerate(analyses.items()):
        lines += ["", f"Worker {i + 1}: {pages:,} pages ({pages * PAGE / 2**20:.1f} MB) the fork shared are now its own copies. By mapping: "
                  + ", ".join(f"{name} {count * PAGE / 2**20:.1f} MB" for name, count in by_mapping.most_common(4)) + ". What changed on them (pages):", ""]
        lines += [f"- {kind}: {count:,} ({count * PAGE / 2**20:.1f} MB)" for kind, count in kinds.most_common()]
    lines += ["", "Pages the fork shared, by the processes that hold a copy of their own (each copy one page more than a single process needs):", "",
              "| own copy in | pages | MB |", "|---|---:|---:|"]
    lines += [f"| {who} | {count:,} | {count * PAGE / 2**20:.1f} |" for who, count in sorted(owners.items(), key=lambda kv: -kv[1])]
    if by_package:
        pages, packages, kinds = by_package
        lines += ["", f"Whose objects differ between the copies on those {pages:,} pages (`--by-package`, bench/heap_census.py; a page shared out between "
                  "the objects on it whose words differ):", "", "| package | pages | | object | pages |", "|---|---:|---|---|---:|"]
        for (package, p), (what, k) in zip(packages.most_common(25), kinds.most_common(25)):
            lines.append(f"| {package} | {p:,.0f} | | {what} | {k:,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "bench" / "results" / ("fork_copies_by_package.md" if by_package else "fork_copies.md")).write_text(text)


if __name__ == "__main__":
    main()
