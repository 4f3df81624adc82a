"""Background work that yields to requests: the log follower's thread, the checkpoint writer."""

from __future__ import annotations

import os
import threading

LOWEST_NICE = 19  # where SCHED_IDLE is not to be had (0 normal, 19 the lowest)
BACKGROUND_NICE = 10  # a thread that must yield to requests yet may hold a lock they wait for (run_in_background)


def run_when_idle() -> None:
    """From now on the calling thread runs only when a core would otherwise idle (Linux's
    SCHED_IDLE, per thread; nice 19 elsewhere). SCHED_IDLE rather than nice 19 because any normal
    thread that wakes takes its core at once, where a nice-19 one may keep it for the rest of its
    slice. Such a thread must not hold a lock a request waits for: it may not get a core for a while."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except (AttributeError, OSError):  # not Linux
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_NICE)
        except (AttributeError, OSError):  # not allowed: at the caller's priority
            pass


def run_in_background() -> None:
    """From now on the calling thread runs at nice 10 (or its own, if lower still): a request's
    thread at nice 0 that wakes takes the core from it far sooner than from an equal, yet on a
    saturated machine it keeps some 10 % of a core (SCHED_IDLE: ~0.3 %), so a lock it holds is soon
    released. For background work that holds a lock a request may wait for (the log follower's
    applier); never lower than the thread's nice, which would need a privilege."""
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, max(BACKGROUND_NICE, os.getpriority(os.PRIO_PROCESS, me)))
    except (AttributeError, OSError):  # not Linux, or not allowed: at the caller's priority
        pass
