"""``AVSEARCH_WORKERS=N``: one collection served by N uvicorn processes on one port.

The process started by ``python -m service serve`` becomes the primary: it loads the collection
once, opens one listening socket per slot on the port (``SO_REUSEPORT``: the kernel spreads
connections over them), forks a worker for each slot but the first, which share the index's memory
copy-on-write, and serves slot 0 itself: N processes in all, so each page a request writes (CPython
writes reference counts) is copied N times, not N + 1. The worker of slot i accepts from socket i.
The primary holds every socket, so connections queued on a slot whose worker stops or dies wait
there for the next worker of that slot. The primary also owns the checkpoints, snapshot archives
and version swaps, and answers the workers' calls (:mod:`store.replication`); like every worker it
follows the log the others append to (:mod:`store.sharedlog` says how a change reaches every
process before its answer). A worker that dies is replaced by a fork of the primary's current
image; the primary's death stops them all. SIGTERM or SIGINT stops the workers (each finishes its
requests) and the primary; SIGHUP swaps versions.

The primary forks while it serves (a replacement, a new generation) only with its own requests held
off: none in flight (a swap or a snapshot file waiting on the primary's work aside), none starting,
its event loop parked. A child of a thread in the middle of an ONNX Runtime or FAISS call, or
holding a metric's lock, could inherit that lock held forever; the child also closes its copies
of the primary's client connections, which would otherwise stay open until it exits.

A version swap loads the new version in the primary, forks a new generation of workers from it,
switches the primary's own requests to it, and retires the old workers: each stops taking requests
(it closes its listening socket and its idle keep-alive connections; a busy one closes after its
answer) and says so before the swap is answered, so no request that starts after the answer is
served by the old version. The old workers then finish their requests and exit. Item changes wait
until they have (a change through the old version during the swap is refused with 503: retry), so
no search mixes versions and none misses an acknowledged change.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from contextlib import ExitStack, contextmanager
from pathlib import Path

import uvicorn
from prometheus_client import values

from index.embedder import MODALITIES, Embedder, choose_providers
from service.app import create_app
from service.bodies import share_parsers, start_parsers, stop_parsers, validate_in_parser
from service.errors import ServerStopping
from service.forking import Quiescence, close_client_connections
from service.prefork import preload, release_free_heap, warm_up
from service.settings import Settings
from service.state import ServiceState
from service.timeouts import deadline_protocol
from store.collection import Collection
from store.errors import ChannelClosed
from store.replication import Channel, Hub, Replica
from store.sharedlog import OPEN, SEALED, WAITING, Follower, LogState, Position
from store.served import check_not_moved
from store.versions import load_next

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 30.0  # a stopped worker finishing its requests; then it is killed
RESPAWN_PAUSE_S = 1.0  # between replacing workers that die at once (a crash loop must not spin)
METRICS_PREFIX = "avsearch-metrics-"  # + the primary's pid: the folder of the workers' metrics files
RETIRE_WAIT_S = 10.0  # an old worker saying it takes no more requests; then it is sent SIGTERM
BACKLOG = 2048  # connections queued on each slot's socket (uvicorn's default)


class SharedParsers(Executor):
    """A worker's parser processes: the primary's (service.bodies.share_parsers)."""

    def __init__(self, replica: Replica):
        self.replica = replica

    def submit(self, function, /, *args, **kwargs) -> Future:
        return self.replica.submit("parse", function, *args)


class Primary:
    """The store's process: the collection, the hub to the workers, the workers themselves, and
    slot 0's requests."""

    def __init__(self, settings: Settings, sockets: list[socket.socket], collection: Collection):
        self.settings, self.sockets, self.collection = settings, sockets, collection
        self.model_dir, self.index_dir = Path(settings.model_dir), Path(settings.index_dir)
        handlers = {"swap": self._swap, "snapshot": self._snapshot, "parse": validate_in_parser, "retired": self._retired}
        self.hub = Hub(handlers)
        self.workers: dict[int, int] = {}  # pid -> generation
        self.slots: dict[int, int] = {}  # pid -> the listening socket it accepts from
        self._retiring: dict[int, threading.Event] = {}  # old workers asked to take no more requests
        self.generation = 0
        self._gate = threading.Condition()  # snapshots and a second swap wait while a swap is under way
        self._swapping, self._in_flight = False, 0
        self._template: WorkerTemplate | None = None  # the workers' app, built once per version
        self._forks: queue.Queue = queue.Queue()  # fork requests for the supervisor's thread, which lives as long as the process (a worker's PR_SET_PDEATHSIG follows the thread that forked it)
        self._stopping = threading.Event()  # SIGTERM/SIGINT: no more forks, swaps or waiting changes
        self._failure: str | None = None  # the index no longer matches the log: the server stops
        self.state = PrimaryState(settings, collection, self)
        self.requests = Quiescence(create_app(settings, state=self.state))  # slot 0's, held off while this process forks
        self.server = PrimaryServer(_uvicorn_config(settings, self.requests), self.requests, self._stop)
        self._follower: Follower | None = None
        self._attach(collection, OPEN)

    # --- calls from the workers ----------------------------------------------------------------
    def _attach(self, collection: Collection, gate: int) -> None:
        """Serve ``collection``: the workers forked from now on append to its logs (``gate``: OPEN,
        or WAITING until the old workers of a swap have left); this process follows them."""
        collection.report_to(self.state.metrics)
        state = LogState(MODALITIES, self.settings.workers)
        for shard in collection.shards.values():
            shard.share(state, gate)
        if self._follower is not None:
            self._follower.stop()
        self._follower = Follower(collection.catch_up, collection.behind, lambda err: None, self.settings.follow_seconds).start()  # a failure is logged, and the supervisor stops the server

    def _set_gates(self, collection: Collection, gate: int) -> None:
        for shard in collection.shards.values():
            shard.set_gate(gate)

    def _snapshot(self, directory: str) -> dict:
        with self._unless_swapping():
            return self.collection.snapshot(Path(directory))

    @contextmanager
    def _unless_swapping(self) -> Iterator[None]:
        """Run the block outside any version swap (it waits for this to end, this for it)."""
        with self._gate:
            self._wait_out_swap("no snapshot was taken")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._gate:
                self._in_flight -= 1
                self._gate.notify_all()

    def _wait_out_swap(self, refused: str) -> None:
        """Holding the gate: wait until no swap is under way; give up, saying ``refused``, once the server stops."""
        self._gate.wait_for(lambda: not self._swapping or self._stopping.is_set())
        if self._stopping.is_set():
            raise ServerStopping(f"the server is stopping: {refused}")

    def _swap(self, model_dir: Path | None, index_dir: Path | None) -> tuple[str, str, dict]:
        """Load a version, fork its workers, switch this process's requests to it, retire the old
        workers; (previous, version, sizes)."""
        with self._gate:
            self._wait_out_swap("no version was swapped in")
            self._swapping = True
            self._gate.wait_for(lambda: self._in_flight == 0)
        try:
            current = self.collection
            self._set_gates(current, SEALED)  # its workers' changes are refused (503: retry); the next version carries what it logged
            configured = self.index_dir if index_dir is None else self.settings.index_dir
            collection, served = load_next(current, lambda: self._load(model_dir, index_dir), configured)
            self.model_dir, self.index_dir = Path(model_dir or self.model_dir), served
            self._attach(collection, WAITING)
            self.collection = collection
            retired = self._new_generation()  # meanwhile this process serves the sealed version: a change is refused, none waits for the forks
            with self.requests.held():  # none of this process's requests is on the old version once it is closed
                self.state.collection = collection
            current.close()
        except BaseException:
            self._open_gate()
            raise
        self._stop_taking_requests(retired)
        threading.Thread(target=self._retire, args=(retired,), name="avsearch-retire", daemon=True).start()
        log.info("swapped in model %s (was %s) across %d processes", collection.version, current.version, self.settings.workers)
        return current.version, collection.version, collection.sizes()

    def _load(self, model_dir: Path | None, index_dir: Path | None) -> Collection:
        if index_dir is None:
            check_not_moved(self.index_dir)  # a reload moved the served index elsewhere
        return load(self.settings, model_dir or self.model_dir, index_dir or self.index_dir)

    def _open_gate(self) -> None:
        """The swap is over (or failed): the served version takes changes again."""
        self._set_gates(self.collection, OPEN)
        with self._gate:
            self._swapping = False
            self._gate.notify_all()

    def _stop_taking_requests(self, pids: list[int]) -> None:
        """Ask the old generation to take no more requests, and wait until each has (or is gone)."""
        asked = {pid: threading.Event() for pid in pids}
        self._retiring.update(asked)
        for pid in pids:
            self.hub.send(pid, ("retire",))
        deadline = time.monotonic() + RETIRE_WAIT_S
        for pid, stopped in asked.items():
            while not stopped.wait(0.05) and pid in self.workers and time.monotonic() < deadline and not self._stopping.is_set():
                pass
            if not stopped.is_set() and pid in self.workers and not self._stopping.is_set():  # once stopping, the stop sends it
                log.warning("worker %d did not stop taking requests within %.0f s; sending SIGTERM", pid, RETIRE_WAIT_S)
                _signal(pid, signal.SIGTERM)
            self._retiring.pop(pid, None)

    def _retired(self, pid: int) -> None:
        """A worker's word that it takes no more requests (it finishes its own, then exits)."""
        stopped = self._retiring.get(pid)
        if stopped is not None:
            stopped.set()

    def _retire(self, pids: list[int]) -> None:
        """Wait for the old generation to finish its requests and exit; changes resume once it has."""
        deadline = time.monotonic() + STOP_GRACE_S
        stopping = self._stopping  # once set, the supervisor no longer counts the dead: the stop waits for them
        while any(pid in self.workers for pid in pids) and time.monotonic() < deadline and not stopping.is_set():
            time.sleep(0.05)
        for pid in pids:
            if pid in self.workers and not stopping.is_set():
                log.warning("worker %d did not finish its requests within %.0f s; killing it", pid, STOP_GRACE_S)
                _signal(pid, signal.SIGKILL)
        while any(pid in self.workers for pid in pids) and not stopping.is_set():
            time.sleep(0.05)
        self._open_gate()

    # --- the workers -----------------------------------------------------------------------------
    def _new_generation(self) -> list[int]:
        """Fork a full set of workers of the current version (in the supervisor's thread); returns the old pids."""
        done = threading.Event()
        old = [pid for pid, generation in self.workers.items() if generation == self.generation]
        self.generation += 1
        self._forks.put((list(range(1, self.settings.workers)), done))
        while not done.wait(0.1):  # the supervisor forks; once it stops looking, nobody will
            if self._stopping.is_set():
                raise ServerStopping("the server stopped during the version swap; GET /v1/info says which version serves")
        return old

    def _fork_worker(self, slot: int) -> None:
        collection = self.collection
        if self._template is None or self._template.primary is not collection:
            self._template = WorkerTemplate(self.settings, collection)  # before the fork: shared by the workers, not built in each
        ours, theirs = socket.socketpair()
        with self.requests.held(), _paused(collection):  # none of this process's requests under way; no process appends: the image is exactly at each log's end
            positions = {m: collection.shards[m].position() for m in MODALITIES}
            for modality, shard in collection.shards.items():  # no checkpoint deletes a segment this worker has not read
                shard.shared.state.set_read(modality, slot, positions[modality].lsn)
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)  # the primary's event loop's: a signal here would wake it
                close_client_connections(self.sockets[0].getsockname()[1])
                ours.close()
                for channel in self.hub.channels.values():  # another worker's channel open here would hide its death
                    channel.sock.close()
                for other in self.sockets[:slot] + self.sockets[slot + 1 :]:
                    other.close()
                _run_worker(self.settings, self.sockets[slot], self._template, Channel(theirs), positions, slot)  # never returns
            theirs.close()
            self.workers[pid], self.slots[pid] = self.generation, slot
            self.hub.attach(pid, Channel(ours))
        log.info("worker %d started (slot %d, generation %d, model %s)", pid, slot, self.generation, collection.version)

    def run(self) -> int:
        """Fork the workers, serve slot 0 and look after the workers until SIGTERM/SIGINT."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop())  # what uvicorn restores (and calls) once it stopped
        signal.signal(signal.SIGINT, lambda *_: self._stop())
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self._swap_on_sighup, daemon=True).start())  # until the app's loop takes it
        for slot in range(1, self.settings.workers):  # before this process serves: nothing to hold off
            self._fork_worker(slot)
        supervisor = threading.Thread(target=self._supervise, name="avsearch-supervisor", daemon=True)
        supervisor.start()
        try:
            self.server.run(sockets=[self.sockets[0]])  # until SIGTERM/SIGINT, or the supervisor stops it
        finally:
            self._stop()
            supervisor.join()
            self._stop_all()
        return 1 if self._failure else 0

    def _stop(self) -> None:
        """SIGTERM/SIGINT, or the supervisor gave up: calls waiting for a swap give up now, not once
        the server has stopped, which waits for them (a swap waiting for its forks does too)."""
        self._stopping.set()
        with self._gate:
            self._gate.notify_all()

    def _supervise(self) -> None:
        """Fork the workers asked for (a swap's generation) and replace those that die."""
        stop, last_respawn = self._stopping, 0.0
        try:
            while not stop.is_set():
                if failure := self.collection.failure():  # the image of every checkpoint and every fork: a worker forked now would serve it
                    log.critical("the primary's index no longer matches the log (%s): stopping the workers. A restart loads the last checkpoint and replays the log (or says where the log is damaged)", failure)
                    self._failure = failure
                    break
                try:
                    slots, done = self._forks.get(timeout=0.1)
                    for slot in slots:
                        self._fork_worker(slot)
                    done.set()
                except queue.Empty:
                    pass
                for pid in self._exited():
                    generation, slot = self.workers.pop(pid), self.slots.pop(pid)
                    self.hub.detach(pid)
                    _mark_dead(pid)
                    if generation == self.generation and not stop.is_set():  # a live worker died: replace it from the current image
                        time.sleep(max(0.0, last_respawn + RESPAWN_PAUSE_S - time.monotonic()))
                        last_respawn = time.monotonic()
                        log.error("worker %d died; starting another", pid)
                        self._fork_worker(slot)
        except BaseException:
            log.exception("the primary's supervisor failed: stopping the server")
            self._failure = self._failure or "supervisor failed"
        finally:
            self._stop()
            self.server.should_exit = True
            for pid in list(self.workers):  # they finish their requests while this process finishes its own
                _signal(pid, signal.SIGTERM)

    def _exited(self) -> list[int]:
        gone = []
        for pid in list(self.workers):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    gone.append(pid)
            except ChildProcessError:
                gone.append(pid)
        return gone

    def _swap_on_sighup(self) -> None:
        try:
            self._swap(None, None)
        except Exception as err:
            log.error("SIGHUP: version not swapped, the current one keeps serving: %s", err)

    def _stop_all(self) -> None:
        for pid in self.workers:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.workers and time.monotonic() < deadline:
            for pid in self._exited():
                self.workers.pop(pid)
                self.slots.pop(pid)
            time.sleep(0.05)
        for pid in self.workers:
            _signal(pid, signal.SIGKILL)
        self.hub.close()
        stop_parsers()
        if self._follower is not None:
            self._follower.stop()
        self.collection.close()  # the log holds every acknowledged change


@contextmanager
def _paused(collection: Collection) -> Iterator[None]:
    """Every modality's commits held off (none half-done): the indexes are at each log's last LSN."""
    with ExitStack() as stack:
        for shard in collection.shards.values():
            stack.enter_context(shard.paused())
        yield


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _mark_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def metrics_directory() -> str:
    """A new folder for every process's metrics files, named for this primary. A primary that was
    killed (SIGKILL, out of memory) left its folder behind: the folders of primaries no longer
    running, or of an earlier process with this pid (a container's primary is pid 1 at every start),
    are removed first."""
    for folder in Path(tempfile.gettempdir()).glob(METRICS_PREFIX + "*"):
        pid = folder.name[len(METRICS_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)  # another user's: left as it is
    return tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load(settings: Settings, model_dir: Path, index_dir: Path) -> Collection:
    """The primary's collection: one encoder thread and one OpenMP thread (see store.replication)."""
    return Collection.load(model_dir, index_dir, device="cpu", intra_op_threads=1, config=settings.store_config())


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker slot, all on one port (``SO_REUSEPORT``: the kernel spreads
    connections over them). A busy port fails here, before any fork."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]  # port 0: the others join the port the first was given
        sock.listen(BACKLOG)  # from now on connections queue, also while a slot's worker is replaced
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


class WorkerTemplate:
    """A worker's app, uvicorn config and collection, built and warmed up in the primary before the
    forks so that the workers share their memory (measured: 4 MB a worker, and service.prefork's
    warm-up); each worker joins the logs and connects its own channel."""

    def __init__(self, settings: Settings, primary: Collection):
        self.primary = primary
        embedder = primary.embedder if _shares_sessions(settings) else None  # else opened in each worker, after the fork
        self.collection = Collection.replica(primary, embedder or primary.embedder)
        self.state = WorkerState(settings, self.collection, None)
        self.app = create_app(settings, state=self.state)
        self.own_sessions = embedder is None
        self.config = _uvicorn_config(settings, self.app)
        self.config.load()  # the protocol classes and the app's outer wrappers, here rather than in each worker
        try:
            warm_up(self.app, self.collection, search=not self.own_sessions)
        except Exception as err:  # an optimisation: the workers start colder, and serve the same
            log.warning("warming the workers' app before the fork failed (%s: %s); each worker warms its own", type(err).__name__, err)

    def connect(self, settings: Settings, channel: Channel, positions: dict[str, Position], slot: int) -> Replica:
        """In the worker: the logs from where its image is, its channel to the primary, its
        encoder sessions where it needs its own."""
        for modality, shard in self.primary.shards.items():  # the primary's handles: held open here, a checkpoint's deleted segments would keep their disk space
            shard.wal.close()
            shard.shared.close()
            self.collection.shards[modality].join(shard.shared.state, positions[modality], slot)
        if self.own_sessions:
            self.collection.embedder = Embedder(self.primary.model_dir, device=settings.device, intra_op_threads=settings.intra_op_threads)
        replica = Replica(channel)
        self.state.replica = replica
        share_parsers(SharedParsers(replica))
        replica.start()
        return replica


def _uvicorn_config(settings: Settings, app) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level="info",
        access_log=settings.access_log,
        http=deadline_protocol(settings.header_timeout, settings.body_timeout),
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=STOP_GRACE_S,
        ws="none",  # no websocket routes: nothing to import for them in each worker
        backlog=BACKLOG,
    )


def _run_worker(settings: Settings, sock: socket.socket, template: WorkerTemplate, channel: Channel, positions: dict[str, Position], slot: int) -> None:
    """The forked child: its own threads and lock over the shared indexes; uvicorn on the port."""
    code = 1
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the primary gone: no log, stop
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app forwards it to the primary
        replica = template.connect(settings, channel, positions, slot)
        server = WorkerServer(replica, template.config)
        replica.on_close = lambda: setattr(server, "should_exit", True)  # no primary: no swaps; the supervisor is gone
        replica.on_retire = server.retire
        Follower(template.collection.catch_up, template.collection.behind, lambda err: setattr(server, "should_exit", True), settings.follow_seconds).start()  # this worker no longer matches the log: a fresh fork replaces it
        gc.freeze()
        server.run(sockets=[sock])
        code = 0
    except BaseException:
        logging.getLogger(__name__).exception("worker %d failed", os.getpid())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class WorkerServer(uvicorn.Server):
    """A worker's uvicorn server, which the primary retires at a version swap: it stops taking
    requests at once (its listening socket closed, so is every idle keep-alive connection, and a
    busy one after its answer, which says ``Connection: close``), tells the primary, then finishes
    its requests and exits."""

    def __init__(self, replica: Replica, config: uvicorn.Config):
        super().__init__(config)
        self.replica = replica
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retire_asked = False
        self._lock = threading.Lock()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        with self._lock:
            self._loop, asked = asyncio.get_running_loop(), self._retire_asked
        if asked:  # retired while starting
            self._stop_taking_requests()

    def retire(self) -> None:
        """From the replica's thread: stop taking requests, in the event loop's thread."""
        with self._lock:
            self._retire_asked, loop = True, self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._stop_taking_requests)

    def _stop_taking_requests(self) -> None:
        for listener in self.servers:  # this process's handle: the primary and the next worker keep the socket
            listener.close()
        for connection in list(self.server_state.connections):  # what uvicorn's shutdown does, done now
            connection.shutdown()
        idle = [c for c in self.server_state.connections if c.transport.is_closing()]
        self._retiring = asyncio.ensure_future(self._say_retired(idle))  # held: the loop keeps only a weak reference

    async def _say_retired(self, idle: list) -> None:
        """Once the idle connections are closed (a client then sees that before it sends on one again)."""
        while any(c in self.server_state.connections for c in idle):  # left when its socket is closed
            await asyncio.sleep(0.002)
        await asyncio.sleep(0)  # the last one's socket is closed after it leaves
        try:
            self.replica.submit("retired", os.getpid())
        except ChannelClosed:
            pass
        self.should_exit = True


class PrimaryServer(uvicorn.Server):
    """Slot 0's server, in the primary's main thread: it tells ``requests`` its event loop, and
    calls ``on_stop`` when SIGTERM/SIGINT stops it (the workers then stop beside it, not after it)."""

    def __init__(self, config: uvicorn.Config, requests: Quiescence, on_stop: Callable[[], None]):
        super().__init__(config)
        self.requests, self.on_stop = requests, on_stop

    def handle_exit(self, sig: int, frame) -> None:
        self.on_stop()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.requests.started()
        await super().startup(sockets)


class PrimaryState(ServiceState):
    """The primary's app state: swaps and snapshot files are its own work (what a worker asks it
    for), and it closes its collection itself, once its workers have stopped."""

    def __init__(self, settings: Settings, collection: Collection, primary: Primary):
        super().__init__(settings, collection)
        self.primary = primary

    async def take_snapshot(self, directory: Path) -> dict:
        with self.primary.requests.waiting_on_process():
            return await asyncio.to_thread(self.primary._snapshot, str(directory))

    async def swap(self, model_dir: Path | None = None, index_dir: Path | None = None) -> tuple[str, str, dict[str, int]]:
        with self.primary.requests.waiting_on_process():  # this request may wait for forks
            previous, version, sizes = await asyncio.to_thread(self.primary._swap, model_dir, index_dir)
        self.metrics.swaps.inc()
        return previous, version, sizes

    async def close_collection(self) -> None:
        """Not at the app's shutdown: the workers still log and follow until they have stopped."""


class WorkerState(ServiceState):
    """A worker's app state: swaps and snapshot archives are the primary's work."""

    def __init__(self, settings: Settings, collection: Collection, replica: Replica | None):
        super().__init__(settings, collection)
        self.replica = replica  # connected in the worker (WorkerTemplate.connect)

    async def take_snapshot(self, directory: Path) -> dict:
        return await asyncio.to_thread(self.replica.call, "snapshot", str(directory))

    async def swap(self, model_dir: Path | None = None, index_dir: Path | None = None) -> tuple[str, str, dict[str, int]]:
        previous, version, sizes = await asyncio.to_thread(self.replica.call, "swap", model_dir, index_dir)
        self.metrics.swaps.inc()  # this worker is retired next; its count stays in the shared metrics
        return previous, version, sizes


def _shares_sessions(settings: Settings) -> bool:
    """Whether a worker can use the primary's encoder sessions (copy-on-write, no second copy): on
    the CPU with one intra-op thread, a session has no thread pool for a fork to break. Others (a
    GPU: a CUDA context never survives a fork) open their own, in the worker."""
    return settings.intra_op_threads == 1 and choose_providers(settings.device)[0] == "CPUExecutionProvider"


def serve(settings: Settings, port: int, announce) -> int:
    """``python -m service serve`` with ``settings.workers`` > 1."""
    metrics_dir = metrics_directory()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # every process writes its figures there...
    values.ValueClass = values.get_value_class()  # ...from the metrics made from now on (it is read when prometheus_client is imported)
    try:
        import faiss

        preload(settings)
        faiss.omp_set_num_threads(1)  # never a thread team in the primary: forked children would hang in theirs
        check_not_moved(settings.index_dir)
        collection = load(settings, settings.model_dir, settings.index_dir)
        sockets = listening_sockets(settings.host, port, settings.workers)
        release_free_heap()
        gc.collect()
        gc.freeze()  # objects made so far stay out of the cyclic GC's scans, which would write to (and so copy) their pages in every worker
        start_parsers()  # the workers' large bodies are parsed here: two processes for the server, not two a worker
        announce(collection)
        print(f"{settings.workers} worker processes share one index (AVSEARCH_WORKERS)", flush=True)
        primary = Primary(settings, sockets, collection)
        try:
            return primary.run()
        finally:
            for sock in sockets:
                sock.close()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
