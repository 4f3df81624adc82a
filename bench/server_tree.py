"""The server's process tree (a primary and what it forked or spawned): find, measure, stop.

Linux only (/proc). Used by bench/worker_memory.py, bench/workers_bench.py and bench/write_bench.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from bench.http_bench import stop

CHILDREN_FILES = any(Path("/proc/self/task").glob("*/children"))  # CONFIG_PROC_CHILDREN


def children(pid: int) -> list[int]:
    if CHILDREN_FILES:
        return [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    tree = [pid]
    for parent in tree:  # grows while it is walked
        tree += children(parent)
    return tree


def settled_tree(pid: int, quiet: float = 2.0, timeout: float = 120.0) -> list[int]:
    """The process tree once it has stayed the same for ``quiet`` seconds (workers still forking)."""
    tree, since, deadline = process_tree(pid), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.2)
        now = process_tree(pid)
        if now != tree:
            tree, since = now, time.monotonic()
    return tree


def process_memory(pid: int) -> dict:
    """PSS, PSS of anonymous pages, RSS and USS (private) bytes of one process, from smaps_rollup."""
    kb = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        kb[name] = int(value.split()[0])
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return {"pid": pid, "command": command[-80:], "pss": kb["Pss"] * 1024, "pss_anon": kb["Pss_Anon"] * 1024, "rss": kb["Rss"] * 1024, "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) * 1024}


def role(process: dict, primary: dict) -> str:
    """What a process of the server's tree is, from its command line."""
    if process is primary:
        return "primary"
    if process["command"] == primary["command"]:
        return "forked"  # a worker (or a snapshot writer): fork without exec
    return next((name for key, name in (("resource_tracker", "mp tracker"), ("spawn_main", "spawned")) if key in process["command"]), process["command"][-30:])


def tree_memory(pid: int) -> dict:
    processes = [process_memory(p) for p in settled_tree(pid)]
    for p in processes:
        p["role"] = role(p, processes[0])
    return {"processes": processes, **{f"total_{k}": sum(p[k] for p in processes) for k in ("pss", "pss_anon", "rss", "uss")}}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_tree(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """Stop the server (SIGTERM to the primary); kill, by pid, what of its tree outlives it by ``grace`` s. Returns how many did."""
    descendants = process_tree(proc.pid)[1:]
    stop(proc)
    deadline = time.monotonic() + grace
    while any(alive(pid) for pid in descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in descendants if alive(pid)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)
