"""The simulator's HTTP side: a threaded HTTP/1.1 server (keep-alive, so a `requests.Session`
reuses its connections), the control endpoints under `/__sim/`, and the `Simulator` facade.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

from worker.simulator import endpoints
from worker.simulator.config import VALUE_FAULTS, SimConfig
from worker.simulator.state import MoveRefused, SimState

log = logging.getLogger(__name__)

_MAX_BODY = 1 << 20
# Linux's SO_TIMESTAMPNS (asm-generic/socket.h; Python's socket module does not name it): the
# kernel stamps each received segment (CLOCK_REALTIME) and recvmsg hands the stamp over as a
# struct timespec. TCP delivers it since Linux 4.13, with MSG_PEEK too.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")
_TIMESPEC_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
_JSON = "application/json; charset=utf-8"
_UNSET: Any = object()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler stuck in a fault's sleep never blocks shutdown
    # The default backlog of 5 makes bursts of new connections wait for SYN retries (1 s+),
    # which would show up as fake latency in the benchmarks.
    request_queue_size = 1024
    sim: Simulator

    def server_activate(self) -> None:
        if self.sim.config.kernel_stamps:
            # On the listening socket: accepted sockets inherit it, and the kernel stamps from
            # now on, so even a connection's first request carries a stamp.
            self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        super().server_activate()

    def server_bind(self) -> None:
        # Bind only: HTTPServer's version also does a reverse-DNS lookup of the host, which
        # stalls start-up where DNS is slow or absent.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self.closing = False
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request is normal (timeouts, killed benchmark
        # processes): not worth socketserver's traceback on stderr.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        log.exception("simulator_connection_failed")

    def track(self, conn: socket.socket) -> bool:
        with self._open_lock:
            if self.closing:
                return False
            self._open.add(conn)
            return True

    def untrack(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(conn)

    def close_connections(self) -> None:
        """Wake every handler blocked on a kept-alive connection, so none outlives stop()."""
        with self._open_lock:
            self.closing = True
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Content-Length on every answer
    server_version = "MidasSimulator/1.0"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body are two writes: do not wait on ACKs
    kernel_at: float | None = None  # the current request's kernel receive time (kernel_stamps)

    def log_message(self, format: str, *args: Any) -> None:
        """No per-request access log: at thousands of requests a second it is only noise."""

    @property
    def _srv(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        self._tracked = self._srv.track(self.connection)
        self._srv.sim._state.connection_opened()

    def handle(self) -> None:
        if self._tracked:
            super().handle()

    def handle_one_request(self) -> None:
        self.kernel_at = self._kernel_receive_time() if self._srv.sim.config.kernel_stamps else None
        super().handle_one_request()

    def _kernel_receive_time(self) -> float | None:
        """When the kernel received the next request's first bytes (unix seconds), waiting for
        them; peeked, so the parser still reads them. None without a stamp (closed, reset).

        The stamp is that of the first queued segment; segments queued behind it before the
        peek may be merged into it, taking the later stamp: a request written in one send (as
        http.client does for small bodies) is one segment on loopback.
        """
        try:
            _data, ancillary, _flags, _addr = self.connection.recvmsg(
                1, _TIMESPEC_SPACE, socket.MSG_PEEK
            )
        except OSError:
            return None  # the parser meets the same error and ends the connection
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack_from(raw)
                return float(sec + nsec / 1e9)
        return None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._srv.untrack(self.connection)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ---------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        data: bytes,
        content_type: str = _JSON,
        *,
        declared_length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header(
            "Content-Length", str(len(data) if declared_length is None else declared_length)
        )
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send(411, _dumps({"error": "send a Content-Length body (no chunked encoding)"}))
            return None
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw else 0
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self.close_connection = True
            self._send(413, _dumps({"error": "Content-Length missing, invalid or above 1 MiB"}))
            return None
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        try:
            url = urlsplit(self.path)
            body = self._read_body()
            if body is None:
                return
            if url.path.startswith("/__sim/"):
                self._control(method, url.path, dict(parse_qsl(url.query)), body)
            else:
                self._api(
                    method, url.path, dict(parse_qsl(url.query, keep_blank_values=True)), body
                )
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away: nobody to answer
        except Exception:
            # The path only: the query carries the access token.
            log.exception("simulator_request_failed", extra={"path": urlsplit(self.path).path})
            self.close_connection = True
            try:
                self._send(500, _dumps({"errcode": -1, "errmsg": "simulator bug"}))
            except OSError:
                pass  # the client is gone too

    # -- Midas and token endpoints ----------------------------------------------------------

    def _api(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        sim = self._srv.sim
        state = sim._state
        route = endpoints.ROUTES.get(path)
        limited, fault = state.admit(path, route.kind if route else "other", self.kernel_at)
        if route is None:
            self._send(404, _dumps({"errcode": 404, "errmsg": "no such endpoint"}))
            return
        is_midas = route.kind == "midas"
        spoil: str | None = None
        if limited:
            payload = endpoints.error(45011)
        elif fault is not None:
            payload = endpoints.fault_answer(fault)
        else:
            payload = endpoints.answer(state, sim.config, route, method, path, query, body)
            has_balance = payload.get("errcode", 0) == 0 and "balance" in payload
            spoil = state.take_answer_fault(path, is_midas, has_balance=has_balance)
        if is_midas and state.latency_s > 0:
            sim._stopping.wait(state.latency_s)  # interruptible: stop() never waits on it
        if spoil is None or spoil in VALUE_FAULTS:
            if spoil is not None:
                payload = endpoints.corrupt(payload, spoil)
            state.record_answer(int(payload.get("errcode", 0)))
            self._send(200, _dumps(payload))
        elif spoil == "timeout":
            # Hold the answer back longer than any sane client timeout, then drop the line.
            sim._stopping.wait(sim.config.timeout_fault_s)
            self.close_connection = True
        elif spoil == "http500":
            self._send(500, b"<html><body>500 Internal Server Error</body></html>", "text/html")
        elif spoil == "malformed_json":
            self._send(200, b'{"errcode":0,"errmsg":"ok","balance":1')
        else:  # truncated: promise the whole answer, send half of it, hang up
            data = _dumps(payload)
            self.close_connection = True
            self._send(200, data[: len(data) // 2], declared_length=len(data))

    # -- control endpoints ------------------------------------------------------------------

    def _control(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        sim = self._srv.sim
        try:
            args: dict[str, Any] = json.loads(body) if body else {}
            if not isinstance(args, dict):
                raise ValueError("the body must be a JSON object")
            status, result = _control(sim, method, path.removeprefix("/__sim/"), query, args)
        except MoveRefused as exc:
            status, result = 409, {"errcode": exc.errcode, "errmsg": exc.errmsg}
        except KeyError as exc:
            status, result = 404, {"error": str(exc.args[0]) if exc.args else "not found"}
        except (ValueError, TypeError) as exc:
            status, result = 400, {"error": str(exc)}
        self._send(status, _dumps(result))


def _opt_str(args: dict[str, Any], name: str, default: str) -> str:
    value = args.get(name, default)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _control(
    sim: Simulator, method: str, name: str, query: dict[str, str], args: dict[str, Any]
) -> tuple[int, Any]:
    """One control call: (HTTP status, JSON result). Bad input raises ValueError (400)."""
    ok = {"ok": True}
    key = (method, name)
    if key == ("GET", "stats"):
        return 200, sim.stats()
    if key == ("GET", "arrivals"):
        return 200, sim.arrivals(query.get("path_prefix"))
    if key == ("GET", "arrival_stamps"):
        return 200, sim.arrival_stamps()
    if key == ("POST", "reset_stats"):
        sim.reset_stats()
        return 200, ok
    if key == ("POST", "faults"):
        sim.inject(
            _opt_str(args, "kind", ""),
            count=args.get("count"),
            rate=args.get("rate"),
            path=args.get("path"),
        )
        return 201, ok
    if key == ("DELETE", "faults"):
        sim.clear_faults()
        return 200, ok
    if key == ("GET", "players"):
        return 200, sim.players()
    if key == ("POST", "players"):
        session_key = args.get("session_key")
        sim.add_player(
            _opt_str(args, "openid", ""),
            _opt_str(args, "zone_id", "1"),
            save=args.get("save", 0),
            present=args.get("present", 0),
            cost=args.get("cost", 0),
            session_key=session_key,
        )
        return 201, ok
    if key == ("GET", "counters"):
        return 200, sim.counters(query.get("openid", ""), query.get("zone_id", "1"))
    if key == ("GET", "movements"):
        return 200, sim.movements()
    if key == ("POST", "move"):
        op = args.get("op")
        openid = _opt_str(args, "openid", "")
        zone_id = _opt_str(args, "zone_id", "1")
        bill_no = _opt_str(args, "bill_no", "")
        if op == "cancelpay":
            return 200, {"errcode": 0, "counters": sim.cancelpay(openid, zone_id, bill_no)}
        moves = {"pay": sim.pay, "present": sim.present, "save": sim.save}
        if op not in moves:
            raise ValueError("op must be pay, present, save or cancelpay")
        # A bad amount reaches the state's own check, which refuses it as Midas would (90018).
        counters = moves[op](openid, zone_id, args.get("amount"), bill_no)  # type: ignore[arg-type]
        return 200, {"errcode": 0, "counters": counters}
    if key == ("POST", "session"):
        session_key = args.get("session_key")
        if session_key is None:
            raise ValueError("session_key is required (use expire_session to drop one)")
        sim.set_session(_opt_str(args, "openid", ""), _opt_str(args, "zone_id", "1"), session_key)
        return 200, ok
    if key == ("POST", "expire_session"):
        sim.expire_session(_opt_str(args, "openid", ""), _opt_str(args, "zone_id", "1"))
        return 200, ok
    if key == ("POST", "expire_tokens"):
        sim.expire_tokens()
        return 200, ok
    if key == ("POST", "token"):
        return 201, {"access_token": sim.issue_token(args.get("ttl_s"))}
    if key == ("POST", "config"):
        sim.configure(
            rate_limit=args.get("rate_limit", _UNSET), latency_ms=args.get("latency_ms", _UNSET)
        )
        return 200, ok
    raise KeyError(f"no control endpoint {method} /__sim/{name}")


class Simulator:
    """A stand-in Midas on a real loopback HTTP server; see `worker.simulator`."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self._state = SimState(self.config)
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on `config.host:config.port` (0 = a free port) and return the base URL."""
        if self._httpd is not None or self._stopping.is_set():
            raise RuntimeError("a simulator starts once")
        host = self.config.host
        server_cls = _Server6 if ":" in host else _Server
        self._httpd = server_cls((host, self.config.port), self)
        port = self._httpd.server_address[1]
        url_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
        if ":" in url_host:
            url_host = f"[{url_host}]"
        self._base_url = f"http://{url_host}:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="midas-simulator",
            daemon=True,
        )
        self._thread.start()
        return self._base_url

    def stop(self) -> None:
        """Stop serving, end kept-alive connections and wake handlers in a fault's sleep."""
        self._stopping.set()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("the simulator is not started")
        return self._base_url

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- players and coins ------------------------------------------------------------------

    def add_player(
        self,
        openid: str,
        zone_id: str = "1",
        *,
        save: int = 0,
        present: int = 0,
        cost: int = 0,
        session_key: str | None = None,
    ) -> None:
        """A new player with these totals; session_key None = no live session."""
        self._state.add_player(
            openid, zone_id, save=save, present=present, cost=cost, session_key=session_key
        )

    def players(self) -> list[dict[str, Any]]:
        """Every player: openid, zone_id, session_key and counters (as `counters()`)."""
        return self._state.players()

    def counters(self, openid: str, zone_id: str = "1") -> dict[str, int | bool]:
        """v1 field names, first_save as a bool; KeyError for an unknown player."""
        return self._state.counters(openid, zone_id)

    def save(self, openid: str, zone_id: str, amount: int, bill_no: str) -> dict[str, int | bool]:
        """A top-up (creates an unknown player); returns the counters after it."""
        order = self._state.credit("save", openid, zone_id, amount, bill_no)
        return self._state.counters(order.openid, order.zone_id)

    def present(
        self, openid: str, zone_id: str, amount: int, bill_no: str
    ) -> dict[str, int | bool]:
        """A gift (creates an unknown player); returns the counters after it."""
        order = self._state.credit("present", openid, zone_id, amount, bill_no)
        return self._state.counters(order.openid, order.zone_id)

    def pay(self, openid: str, zone_id: str, amount: int, bill_no: str) -> dict[str, int | bool]:
        """A spend; raises MoveRefused (90012, 90013, 90018) as the API would answer."""
        order = self._state.pay(openid, zone_id, amount, bill_no)
        return self._state.counters(order.openid, order.zone_id)

    def cancelpay(self, openid: str, zone_id: str, bill_no: str) -> dict[str, int | bool]:
        """Roll back a pay; raises MoveRefused (90000, 90015)."""
        order = self._state.cancelpay(openid, zone_id, bill_no)
        return self._state.counters(order.openid, order.zone_id)

    def movements(self) -> list[dict[str, Any]]:
        """Every movement in order, in ledger terms: bill_no, kind (save, present, cost,
        cancel), openid, zone_id, amount, at (unix seconds); a cancel has ref_bill_no."""
        return self._state.movements()

    def set_session(self, openid: str, zone_id: str, session_key: str) -> None:
        """A login: the new session_key replaces the old one, which stops working."""
        self._state.set_session(openid, zone_id, session_key)

    def expire_session(self, openid: str, zone_id: str = "1") -> None:
        self._state.set_session(openid, zone_id, None)

    # -- tokens, faults, settings, statistics -----------------------------------------------

    def expire_tokens(self) -> None:
        """Every access token issued so far answers 42001 from now on."""
        self._state.expire_tokens()

    def issue_token(self, ttl_s: float | None = None) -> str:
        """A valid access token, as a central token service would hand out."""
        return self._state.issue_token(ttl_s)

    def inject(
        self,
        kind: str,
        *,
        count: int | None = None,
        rate: float | None = None,
        path: str | None = None,
    ) -> None:
        """Fault the next `count` matching requests (default 1), or each with probability
        `rate` (seeded RNG).

        `path` is a path prefix; None matches every Midas endpoint (not the token ones).
        """
        self._state.inject(kind, count=count, rate=rate, path=path)

    def clear_faults(self) -> None:
        self._state.clear_faults()

    def configure(self, *, rate_limit: float | None = _UNSET, latency_ms: float = _UNSET) -> None:
        """Change the rate limit (None = off) or the latency while running."""
        self._state.configure(
            rate_limit=self._state.rate_limit if rate_limit is _UNSET else rate_limit,
            latency_ms=self._state.latency_s * 1000.0 if latency_ms is _UNSET else latency_ms,
        )

    def stats(self) -> dict[str, Any]:
        """requests, by_path, by_errcode, max_per_second, token_calls (see the package doc)."""
        return self._state.stats()

    def arrivals(self, path_prefix: str | None = None) -> list[float]:
        """Sorted time.monotonic() arrival times: Midas endpoints, or paths under a prefix."""
        return self._state.arrivals(path_prefix)

    def arrival_stamps(self) -> list[tuple[float | None, float]]:
        """With `SimConfig.kernel_stamps`: per Midas arrival, (when the kernel received its
        first bytes, when its handler counted it), unix seconds, in the handler's order. The
        kernel's is what a remote Midas would count; the handler's adds this process's own
        scheduling (GIL, threads). The kernel's is None if the socket gave no stamp."""
        return self._state.arrival_stamps()

    def reset_stats(self) -> None:
        self._state.reset_stats()
