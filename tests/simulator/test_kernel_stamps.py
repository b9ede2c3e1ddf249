"""The kernel's receive time of each Midas arrival (`SimConfig.kernel_stamps`): the clock a
remote Midas would count by, apart from the simulator's own scheduling."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from tests.simulator.conftest import Api, start
from worker.simulator import SimConfig

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_TIMESTAMPNS is Linux's"
)

PATH = "/cgi-bin/midas/sandbox/getbalance"


def raw_request(conn: socket.socket, port: int) -> tuple[float, float]:
    """Write one small getbalance in one send; (just before, just after) the send."""
    body = b'{"openid":"o"}'
    head = (
        f"POST {PATH}?access_token=x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = time.time()
    conn.sendall(head + body)
    after = time.time()
    return before, after


def read_answer(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += conn.recv(4096)
    return head


@pytest.mark.integration
def test_a_stalled_simulator_counts_late_but_the_kernel_stamp_is_the_arrival() -> None:
    sim = start(SimConfig(kernel_stamps=True))
    try:
        with socket.create_connection(("127.0.0.1", sim.port)) as conn:
            # First request on a fresh connection: the stamp comes from the listening socket's
            # option, inherited at accept.
            first = raw_request(conn, sim.port)
            read_answer(conn)
            # The handler is held (as a thread that does not get the GIL would be) while the
            # second request's bytes arrive: it counts late, the kernel did not.
            lock = sim._state._lock
            lock.acquire()
            try:
                second = raw_request(conn, sim.port)
                time.sleep(0.2)
            finally:
                lock.release()
            read_answer(conn)
        stamps = sim.arrival_stamps()
    finally:
        sim.stop()
    assert len(stamps) == 2
    (k1, h1), (k2, h2) = stamps
    assert k1 is not None and k2 is not None
    # On loopback the segment reaches the server's socket inside the client's send call.
    assert first[0] <= k1 <= first[1] + 0.001
    assert second[0] <= k2 <= second[1] + 0.001
    assert k1 <= h1
    assert h2 - k2 >= 0.2  # the handler's count lagged; the kernel's stamp did not


@pytest.mark.integration
def test_kernel_stamps_keep_the_api_and_are_off_by_default() -> None:
    sim = start(SimConfig(kernel_stamps=True))
    api = Api(sim)
    try:
        for _ in range(5):
            assert api.v1("getbalance")["errcode"] == 0
        stamps = sim.arrival_stamps()
        arrivals = sim.arrivals()
        via_http = api.http.get(f"{sim.base_url}/__sim/arrival_stamps", timeout=5).json()
    finally:
        api.close()
        sim.stop()
    assert len(stamps) == len(arrivals) == 5  # Midas arrivals only, not the token call
    assert all(k is not None and 0 <= h - k < 1.0 for k, h in stamps)
    assert [tuple(s) for s in via_http] == stamps
    plain = start()
    plain_api = Api(plain)
    try:
        assert plain_api.v1("getbalance")["errcode"] == 0
        assert plain.arrival_stamps() == []
        assert len(plain.arrivals()) == 1
    finally:
        plain_api.close()
        plain.stop()


@pytest.mark.integration
def test_stop_wakes_a_handler_waiting_in_the_peek() -> None:
    sim = start(SimConfig(kernel_stamps=True))
    httpd = sim._httpd
    assert httpd is not None
    conn = socket.create_connection(("127.0.0.1", sim.port))
    try:
        deadline = time.monotonic() + 5
        while not httpd._open and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(httpd._open) == 1  # its handler now waits in the peek, on an idle connection
        sim.stop()
        # The handler left the peek and finished (it untracks its connection last).
        deadline = time.monotonic() + 5
        while httpd._open and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not httpd._open
        conn.settimeout(5)
        assert conn.recv(1) == b""  # and the client sees the connection end
    finally:
        conn.close()
