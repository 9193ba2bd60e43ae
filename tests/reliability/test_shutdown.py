"""The embedded server on SIGTERM: in-flight requests finish, then the process exits 0 and the port closes.

"In flight" is made certain with streams: all of them are opened together,
and SIGTERM is sent as soon as half have received their first refined
answer, so the server has accepted every one and still owes each of them work
(more streams than the server has threads: some wait in its queue). The
server is started here (not by the shared fixture) because the test ends it.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

from npas_serve.client import Client, ClientError
from tests.reliability.support import expected_answer, matches
from tests.support.servers import CLI, free_port, wait_port

STREAMS = 12
BATCH = 256                     # the largest batch: each member holds the engine for a while
N_MEMBERS = 3


def test_sigterm_drains_in_flight_streams_then_exits(served_checkpoint, pool, reference, figures):
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", str(served_checkpoint), "--grpc-port", str(port),
                             "--metrics-port", str(free_port()),
                             # every stream is admitted (the drain is under test, not the queue bound)
                             "--queue-examples", str(STREAMS * BATCH)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    x = pool[:BATCH]
    expected = expected_answer(reference, x)
    streams: dict[int, dict] = {i: {"answers": [], "first": None, "final": None, "error": None} for i in range(STREAMS)}
    first_seen = threading.Semaphore(0)

    def stream(i):
        s = streams[i]
        with Client(f"127.0.0.1:{port}", "npas", timeout=90) as c:
            try:
                for answer in c.stream(x, request_id=f"drain-{i}"):
                    s["answers"].append(answer)
                    if s["first"] is None:
                        s["first"] = time.monotonic()
                        first_seen.release()
                    if answer.final:
                        s["final"] = time.monotonic()
            except ClientError as err:
                s["error"] = err
                first_seen.release()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(STREAMS)]
    try:
        wait_port(port, proc)
        for t in threads:
            t.start()
        for _ in range(STREAMS // 2):
            assert first_seen.acquire(timeout=120), "no stream answered"
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
        exited_at = time.monotonic()
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    in_flight = [s for s in streams.values() if s["final"] is None or s["final"] > sigterm_at]
    completed = [s for s in in_flight if s["error"] is None and s["final"] is not None
                 and [a.final for a in s["answers"]] == [False] * (N_MEMBERS - 1) + [True]
                 and all(a.request_id == s["answers"][0].request_id for a in s["answers"])
                 and matches(s["answers"][-1], expected)]
    with socket.socket() as sock:
        refused = sock.connect_ex(("127.0.0.1", port)) != 0
    with Client(f"127.0.0.1:{port}", "npas", timeout=10) as c:
        try:
            c.predict(x[:1])
            after = "OK"
        except ClientError as err:
            after = err.code
    figures.put("faults", "embedded_sigterm_drain", {
        "streams": STREAMS, "in_flight_at_sigterm": len(in_flight), "in_flight_completed_ok": len(completed),
        "errors": [str(s["error"]) for s in streams.values() if s["error"] is not None],
        "exit_code": proc.returncode, "drain_s": round(exited_at - sigterm_at, 2),
        "new_connection_refused": refused and after == "UNAVAILABLE",
        "survived": proc.returncode == 0 and len(completed) == len(in_flight) > 0})
    assert proc.returncode == 0 and "stopped" in output, output
    assert len(in_flight) >= STREAMS - STREAMS // 2
    assert len(completed) == len(in_flight), [str(s["error"]) for s in streams.values()]
    assert max(s["final"] for s in completed) <= exited_at
    assert refused and after == "UNAVAILABLE", after
