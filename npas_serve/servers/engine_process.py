"""The engine in a process of its own, behind the surface the servers use: the embedded server's default.

Why: in one process, the gRPC event loop and the engine's device thread share one GIL. Under load
the loop's Python (gRPC's handling of each call, parsing, encoding) holds it while the device
thread waits to take it back after every operator: at 90% of capacity the device thread had a
CPU for under half of its time in rounds (`npas_device_*_seconds_total`), and the server used
about one core of two. TorchServe, whose frontend and worker are separate processes, served 1.46x
the embedded server's 64-client throughput in the same run (docs/serving.md).

So the server's process keeps gRPC, parsing and encoding, and a child process keeps the engine,
its device thread and the Prometheus metrics (whose figures are the engine's). They speak over a
pipe: requests (parsed, with their knobs) and cancellations one way, each answer, or the error that
ends a request, the other; the embedded server reads the answers on its event loop (`read_on`).
`EngineProcess` has the methods of `Engine` the servers call, so the servicers do not know which
one they hold.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import logging
import multiprocessing
import select
import signal
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from npas_serve.engine import Engine, EngineConfig
from npas_serve.engine.engine import final_answer
from npas_serve.engine.run import DeadlineExceeded, Delivery, expired
from npas_serve.errors import UserError
from npas_serve.protocol import InferenceRequest, InferenceResponse, RequestError, parse_request
from npas_serve.servers.heap import freeze_loaded
from npas_serve.servers.metrics import serve_metrics

log = logging.getLogger(__name__)


class EngineProcessError(RuntimeError):
    """The engine's process stopped: the requests it held end with this error."""


class _Call:
    """A request handed to the engine's process: what `Engine.submit` returns, as far as the servers go."""

    def __init__(self, owner: "EngineProcess", rid: int):
        self._owner, self._rid = owner, rid

    def cancel(self) -> None:
        """Drop its work in the engine's process (a no-op once it has ended)."""
        self._owner._cancel(self._rid)


class EngineProcess:
    """`Engine.load(checkpoint, config)` in a child process, with its metrics on `metrics_host:metrics_port`
    (0: any free port; `metrics_port` then says which). Raises UserError when the child cannot start."""

    def __init__(self, checkpoint: str | Path, config: EngineConfig, metrics_host: str = "127.0.0.1",
                 metrics_port: int = 8082):
        context = multiprocessing.get_context("spawn")      # no fork of a process that holds threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_child, name="npas-engine", daemon=True,
                                        args=(child_conn, str(checkpoint), config, metrics_host, metrics_port))
        self._process.start()
        child_conn.close()
        try:
            started = self._conn.recv()
        except EOFError:
            self._process.join(5)
            started = ("failed", f"the engine process exited with status {self._process.exitcode} while loading")
        if started[0] != "ready":
            self._process.join(10)
            raise UserError(started[1])
        _, self.limits, self.manifest, self.metrics_port = started
        self._send_lock = threading.Lock()
        self._pending: dict[int, Delivery] = {}
        self._ids = itertools.count()
        self._alive = True
        self._reader: threading.Thread | None = None        # answers read on a thread of their own,
        self._loop: asyncio.AbstractEventLoop | None = None  # or on an event loop (`read_on`)
        self._reading = threading.Lock()
        self._more = select.poll()          # on the loop: whether another answer is already in the pipe
        # before multiprocessing's own exit hook, which would wait for a child that ignores SIGTERM
        atexit.register(self.close)

    # --- the surface of Engine the servers use ----------------------------------------------------
    def parse(self, fields: Mapping[str, bytes | str]) -> InferenceRequest:
        """Parsed here, in the server's process; a bad request is counted in the engine's metrics."""
        try:
            return parse_request(fields, self.limits)
        except RequestError:
            self._send(("invalid",))
            raise

    def submit(self, requests: Sequence[InferenceRequest], deliveries: Sequence[Delivery],
               intermediate: bool | Sequence[bool] = False, together: bool = False) -> list[_Call]:
        """`Engine.submit` in the engine's process; each answer (or the error that ends the request)
        reaches its delivery on the loop given to `read_on`, or else on a reading thread of this process.

        A request whose deadline has already passed ends here, at once, with the DeadlineExceeded
        the engine would give it, and is counted in its metrics, but never crosses the pipe: when the
        server falls behind, most of the calls it refuses come after their deadline, and each would
        cost both processes a request and an answer on the pipe."""
        flags = [intermediate] * len(requests) if isinstance(intermediate, bool) else list(intermediate)
        self._read_on_a_thread()
        now_unix_ms = time.time() * 1000
        rids = [next(self._ids) for _ in requests]
        self._pending.update(zip(rids, deliveries, strict=True))
        items, late = [], []
        for item in zip(rids, requests, flags, strict=True):
            (late if expired(item[1], now_unix_ms) else items).append(item)
        if items and not self._send(("submit", items, together)):
            for rid, _, _ in items:
                self._end(rid, EngineProcessError("the engine process has stopped"))
        if late:
            self._send(("expired", [request.mode for _, request, _ in late]))
            for rid, _, _ in late:
                self._end(rid, DeadlineExceeded.on_arrival())
        return [_Call(self, rid) for rid in rids]

    def answer(self, request: InferenceRequest) -> InferenceResponse:
        """The final answer only (the v2 REST endpoints call this from their threads)."""
        return final_answer(self.submit, request)

    def ready(self) -> bool:
        return self._alive and self._process.is_alive()

    def read_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the answers on `loop` (the gRPC server's event loop, where the calls wait for them),
        before the first request, instead of on a thread of their own.

        Why: a reading thread has to take the GIL from the loop for every answer, and the loop then
        takes it back, and has each answer handed to it through its self-pipe: under load that thread
        used 0.11 of a core at 892 requests/s beside the loop's 0.51, and an answer waited for the GIL
        while the loop ran other calls. On the loop, the answers in the pipe are read when it is
        readable and each handed to its call at once. (A message is read whole: one the engine's
        process is still writing holds the loop until its last byte, which the pipe has a moment later.)"""
        with self._reading:
            if self._reader is not None or self._loop is not None:
                raise RuntimeError("the answers are already read elsewhere")
            self._loop = loop
            self._more.register(self._conn.fileno(), select.POLLIN)
            loop.add_reader(self._conn.fileno(), self._read_waiting)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the queued work in the engine's process, then stop it (again: nothing)."""
        atexit.unregister(self.close)
        if self._send(("close",)):
            self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._reader is not None:
            self._reader.join(5)
        elif self._loop is not None and not self._conn.closed:
            self._stop_reading_on_loop()
        self._conn.close()

    # --- the pipe ----------------------------------------------------------------------------------
    def _send(self, message: tuple) -> bool:
        """False when the engine's process is gone."""
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, EOFError, ValueError):     # ValueError: the connection was closed here
            return False

    def _cancel(self, rid: int) -> None:
        if rid in self._pending:
            self._send(("cancel", rid))

    def _end(self, rid: int, item) -> None:
        deliver = self._pending.pop(rid, None)
        if deliver is not None:
            _deliver(deliver, item)

    def _read_on_a_thread(self) -> None:
        """Start the reading thread, unless the answers are read already (checked first without the
        lock: every request comes by here)."""
        if self._reader is not None or self._loop is not None:
            return
        with self._reading:
            if self._reader is None and self._loop is None:
                self._reader = threading.Thread(target=self._read, name="npas-engine-answers", daemon=True)
                self._reader.start()

    def _read(self) -> None:
        """The reading thread: every answer until the engine's process ends."""
        try:
            while True:
                self._hand_all(self._conn.recv())
        except (EOFError, OSError):
            pass
        finally:
            self._stopped()

    def _read_waiting(self) -> None:
        """On the loop, when the pipe is readable: every answer already in it (a step of the device
        thread ends many requests at once; one loop pass each would cost a poll of every socket each)."""
        try:
            while True:
                self._hand_all(self._conn.recv())
                if not self._more.poll(0):
                    return
        except (EOFError, OSError):
            self._stop_reading_on_loop()
            self._stopped()

    def _stop_reading_on_loop(self) -> None:
        try:
            self._loop.remove_reader(self._conn.fileno())
        except (RuntimeError, ValueError, OSError):     # the loop has closed: nothing to remove
            pass

    def _hand_all(self, message) -> None:
        """A message from the engine's process: one (request, answer) pair, or a list of a step's."""
        for rid, item in message if isinstance(message, list) else [message]:
            self._hand(rid, item)

    def _hand(self, rid: int, item) -> None:
        """An answer (or the error that ends a request) to its delivery."""
        if isinstance(item, BaseException) or item.final:
            self._end(rid, item)
        elif (deliver := self._pending.get(rid)) is not None:
            _deliver(deliver, item)

    def _stopped(self) -> None:
        """The engine's process ended: every request still waiting gets EngineProcessError."""
        self._alive = False
        for rid in list(self._pending):
            self._end(rid, EngineProcessError("the engine process stopped before this request ended"))


def _deliver(deliver: Delivery, item) -> None:
    try:
        deliver(item)
    except Exception:       # one caller's failure is its own
        log.exception("delivering an answer failed")


# --- the engine's process ----------------------------------------------------------------------------
def _child(conn, checkpoint: str, config: EngineConfig, metrics_host: str, metrics_port: int) -> None:
    """Load, serve metrics, then run what the server sends until it says close (or goes away)."""
    # a signal to the whole group (a terminal's Ctrl-C, `tini -g` in a container) is the server's to act
    # on: it drains its calls, then closes this process. A server that dies instead closes the pipe,
    # which ends this process too
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    try:
        engine = Engine.load(checkpoint, config)
    except Exception as err:
        conn.send(("failed", f"cannot load {checkpoint}: {type(err).__name__}: {err}"))
        return
    try:
        metrics = serve_metrics(engine, config.model_name, metrics_host, metrics_port)
    except UserError as err:
        engine.close()
        conn.send(("failed", str(err)))
        return
    freeze_loaded()
    conn.send(("ready", engine.limits, engine.manifest, metrics.server_port))
    lock = threading.Lock()         # the device thread and this one both send
    runs = {}
    step, kept = threading.local(), []      # a step's answers, kept to be written together

    def deliver(rid: int, item) -> None:
        if isinstance(item, BaseException) or item.final:
            runs.pop(rid, None)
        if getattr(step, "open", False):
            kept.append((rid, item))
            return
        with lock:
            conn.send((rid, item))

    @contextlib.contextmanager
    def together():
        """A step's answers in one write: one system call here and one wake-up there, not one each."""
        step.open = True
        try:
            yield
        finally:
            step.open = False
            if kept:
                items = kept[:]
                kept.clear()
                try:
                    with lock:
                        conn.send(items)
                except (OSError, EOFError, ValueError):     # the server went away: nobody waits for them
                    log.warning("the server's end of the pipe is gone; %d answers dropped", len(items))

    engine.deliver_together(together)

    try:
        while True:
            message = conn.recv()
            if message[0] == "submit":
                _, items, together = message
                made = engine.submit([r for _, r, _ in items], [functools.partial(deliver, rid) for rid, _, _ in items],
                                     [flag for *_, flag in items], together)
                for (rid, _, _), run in zip(items, made):
                    runs[rid] = run
                    if run.done:            # it ended before it was listed: its delivery found nothing to drop
                        runs.pop(rid, None)
            elif message[0] == "cancel":
                if (run := runs.get(message[1])) is not None:
                    run.cancel()
            elif message[0] == "invalid":
                engine.count_invalid()
            elif message[0] == "expired":
                for mode in message[1]:
                    engine.count_expired(mode)
            elif message[0] == "close":
                break
    except (EOFError, OSError):             # the server went away: nobody waits for answers
        pass
    finally:
        engine.close()
        metrics.shutdown()
        conn.close()

