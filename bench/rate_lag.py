"""Diagnostic for benchmark 1: where does the delay between a rate grant and its arrival go?

Not a benchmark of the product's throughput: it times, for every request, the stages between
the moment the Redis schedule reserved for it and the moment the simulator counted it:

- ``sched``: the reserved moment (the Lua script's `at`, the Redis server's clock);
- ``wake``: the caller leaves `limiter.slot()`'s wait (``wake - sched``: sleep overshoot and
  the Redis round trip);
- ``post``: `Session.send` is called with the prepared request (``post - wake``);
- ``send``: the request's first bytes go into the socket (``send - wake``: signing, requests,
  the connection pool, a new TCP connection, the GIL). On loopback the kernel hands the bytes
  to the server's socket inside this very call, so ``send`` is the arrival at the host;
- ``kernel``: the kernel received the request's first bytes at the simulator's socket
  (SO_TIMESTAMPNS; ``kernel - send``: ~0 on loopback);
- ``sim``: the simulator's handler thread counts it (``sim - kernel``: the simulator's own
  scheduling, i.e. the arrival *measurement*, which a remote Midas would not add).

P processes x T threads call the production `MidasClient.get_balance` through a `RedisLimiter`
(the production classes, patched from outside only to read these clocks: nothing in `worker/`
logs them). Redis `TIME`, `time.time()` in the clients and in the simulator all read the same
host clock (CLOCK_REALTIME), so the stages subtract directly.

    flock /work/bench.lock python -m bench.rate_lag --rate 100 --margin 0.02 --hogs 2

`--hogs K` adds K busy processes (a CPU-starved VM, on top of whatever else runs).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REDIS_URL,
    RESULTS,
    flush_redis,
    midas_counters,
    openid,
    percentiles_ms,
    session_key,
)

LEDGER_ROWS = 3


# -- the simulator, with its arrival stamps kept per openid -------------------------------------


def _serve(n: int, latency_ms: float, conn: Any, switch_s: float) -> None:  # pragma: no cover
    import sys

    from worker.simulator import SimConfig, Simulator, server

    sys.setswitchinterval(switch_s)

    stamps: dict[str, tuple[float, float, float | None]] = {}
    local = threading.local()
    parse = server._Handler.parse_request
    api = server._Handler._api

    def parse_request(self: Any) -> bool:
        local.parsed = time.time()  # the request line has just been read
        return bool(parse(self))

    def _api(self: Any, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        counted = time.time()  # `admit` (the count) is the next thing the original does
        try:
            oid = str(json.loads(body)["openid"])
        except (ValueError, KeyError, TypeError):
            oid = ""
        if oid and oid not in stamps:
            stamps[oid] = (local.parsed, counted, self.kernel_at)
        api(self, method, path, query, body)

    server._Handler.parse_request = parse_request  # type: ignore[method-assign]
    server._Handler._api = _api  # type: ignore[method-assign]
    sim = Simulator(
        SimConfig(latency_ms=latency_ms, max_recorded_arrivals=3_000_000, kernel_stamps=True)
    )
    for i in range(1, n + 1):
        save, present, cost = midas_counters(i, LEDGER_ROWS)
        sim.add_player(
            openid(i), "1", save=save, present=present, cost=cost, session_key=session_key(i)
        )
    sim.start()
    conn.send(sim.port)
    conn.recv()
    conn.send(stamps)
    sim.stop()


# -- the clients ----------------------------------------------------------------------------


def _client(
    env: dict[str, str],
    first: int,
    threads: int,
    seconds: float,
    barrier: Any,
    out: Any,
    switch_s: float,
) -> None:  # pragma: no cover - child process
    import http.client
    import sys

    sys.setswitchinterval(switch_s)

    import redis as redis_lib

    from worker.config import load_settings
    from worker.midas import limiter as limiter_mod
    from worker.midas.client import MidasClient

    local = threading.local()
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    reserve = limiter_mod.RedisLimiter._reserve
    acquire = limiter_mod._ScheduledLimiter._acquire
    post = MidasClient._post
    send = http.client.HTTPConnection.send
    connect = http.client.HTTPConnection.connect

    def _reserve(self: Any, holder: str, has_slot: bool, gap_us: int = 0) -> Any:
        reply = reserve(self, holder, has_slot, gap_us)
        if reply[0] == limiter_mod._GRANTED:
            local.grants = getattr(local, "grants", 0) + 1
            local.sched = reply[2] / 1e6
        return reply

    def _acquire(self: Any, prepare: Any) -> Any:
        local.grants = 0
        holder = acquire(self, prepare)
        local.rec = {
            "sched": local.sched,
            "wake": time.time(),
            "rescheduled": local.grants - 1,
            "post": None,
            "send": None,
            "new_conn": False,
        }
        return holder

    def _post(self: Any, prepared: Any) -> Any:
        rec = getattr(local, "rec", None)
        if rec is not None and rec["post"] is None:
            rec["post"] = time.time()  # the request is ready; Session.send takes it from here
        return post(self, prepared)

    def _send(self: Any, data: Any) -> None:
        rec = getattr(local, "rec", None)
        if rec is not None and rec["send"] is None:
            rec["send"] = time.time()
        send(self, data)

    def _connect(self: Any) -> None:
        rec = getattr(local, "rec", None)
        if rec is not None:
            rec["new_conn"] = True
        connect(self)

    limiter_mod.RedisLimiter._reserve = _reserve  # type: ignore[method-assign]
    limiter_mod._ScheduledLimiter._acquire = _acquire  # type: ignore[method-assign]
    MidasClient._post = _post  # type: ignore[method-assign]
    http.client.HTTPConnection.send = _send  # type: ignore[method-assign]
    http.client.HTTPConnection.connect = _connect  # type: ignore[method-assign]

    settings = load_settings(env)
    redis = redis_lib.Redis.from_url(env["REDIS_URL"], socket_timeout=10.0)
    limiter = limiter_mod.make_limiter(settings, redis)
    client = MidasClient.from_settings(settings, limiter=limiter, redis=redis)
    client.get_balance(openid(first), "1", session_key(first))  # the token, before the clock
    barrier.wait(timeout=120)
    deadline = time.monotonic() + seconds
    counter = iter(range(first + 1, first + 100_000_000))

    def work() -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next(counter)
            local.rec = None
            try:
                client.get_balance(openid(i), "1", session_key(i))
                outcome = "ok"
            except Exception as exc:  # noqa: BLE001 - any answer is an arrival; only timing matters
                outcome = type(exc).__name__
            rec = local.rec
            if rec is not None:
                with lock:
                    records.append({**rec, "openid": openid(i), "outcome": outcome})

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(records)


def _hog(stop: Any) -> None:  # pragma: no cover - child process
    while not stop.is_set():
        sum(range(10_000))


# -- the figures ----------------------------------------------------------------------------


def _windows(times: list[float], rate: float) -> dict[str, Any]:
    from worker.simulator import max_per_window

    ts = sorted(times)
    n = max(1, int(rate))
    tight = min((ts[i + n] - ts[i] for i in range(len(ts) - n)), default=0.0)
    return {"max_in_any_1s": max_per_window(ts), "tightest_n_plus_1_span_s": round(tight, 4)}


def analyse(records: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    done = [r for r in records if r["send"] is not None and "sim" in r]
    kernel = [r for r in done if r["kernel"] is not None]
    sched = sorted(r["sched"] for r in done)
    span = sched[-1] - sched[0] if len(sched) > 1 else 0.0
    sends = sorted(r["send"] for r in done)
    send_span = sends[-1] - sends[0] if len(sends) > 1 else 0.0
    return {
        "requests": len(done),
        "rescheduled": sum(r["rescheduled"] for r in records),
        "without_kernel_stamp": len(done) - len(kernel),
        "new_connections": sum(1 for r in done if r["new_conn"]),
        "outcomes": {
            o: sum(1 for r in done if r["outcome"] == o) for o in {r["outcome"] for r in done}
        },
        "utilisation_at_send": round((len(sends) - 1) / send_span / rate, 4) if send_span else 0,
        "utilisation_of_schedule": round((len(sched) - 1) / span / rate, 4) if span else 0,
        "lag_ms": {
            "wake_minus_sched": percentiles_ms([r["wake"] - r["sched"] for r in done]),
            "send_minus_wake": percentiles_ms([r["send"] - r["wake"] for r in done]),
            "post_minus_wake": percentiles_ms([r["post"] - r["wake"] for r in done]),
            "send_minus_post": percentiles_ms([r["send"] - r["post"] for r in done]),
            "send_minus_wake_new_conn": percentiles_ms(
                [r["send"] - r["wake"] for r in done if r["new_conn"]]
            ),
            "sim_parse_minus_send": percentiles_ms([r["parse"] - r["send"] for r in done]),
            "sim_count_minus_send": percentiles_ms([r["sim"] - r["send"] for r in done]),
            "send_minus_sched": percentiles_ms([r["send"] - r["sched"] for r in done]),
            "sim_count_minus_sched": percentiles_ms([r["sim"] - r["sched"] for r in done]),
            "kernel_minus_send": percentiles_ms([r["kernel"] - r["send"] for r in kernel]),
            "sim_count_minus_kernel": percentiles_ms([r["sim"] - r["kernel"] for r in kernel]),
            "kernel_minus_sched": percentiles_ms([r["kernel"] - r["sched"] for r in kernel]),
        },
        "windows": {
            "schedule": _windows(sched, rate),
            "wake": _windows([r["wake"] for r in done], rate),
            "send": _windows(sends, rate),
            "sim_count": _windows([r["sim"] for r in done], rate),
            "kernel": _windows([r["kernel"] for r in kernel], rate),
        },
        "worst_sim_lag": sorted(
            (
                {
                    "wake_ms": round((r["wake"] - r["sched"]) * 1000, 2),
                    "send_ms": round((r["send"] - r["wake"]) * 1000, 2),
                    "sim_ms": round((r["sim"] - r["send"]) * 1000, 2),
                    "new_conn": r["new_conn"],
                }
                for r in done
            ),
            key=lambda x: -(x["wake_ms"] + x["send_ms"] + x["sim_ms"]),
        )[:5],
    }


def run(
    rate: float,
    seconds: float,
    processes: int,
    threads: int,
    margin: float,
    hogs: int,
    switch_s: float = 0.005,
) -> dict[str, Any]:
    from tests.orchestration.conftest import world_env

    ctx = multiprocessing.get_context("spawn")
    per = int(rate * seconds * 1.5 / processes) + 1_000  # accounts per client process
    n = per * processes
    parent, child = ctx.Pipe()
    sim = ctx.Process(target=_serve, args=(n, 50.0, child, switch_s), daemon=True)
    sim.start()
    port = parent.recv()
    flush_redis(REDIS_URL)
    env = world_env(
        "postgresql+psycopg://unused@127.0.0.1/unused",
        REDIS_URL,
        f"http://127.0.0.1:{port}",
        MIDAS_RATE_LIMIT=f"{rate:g}",
        MIDAS_RATE_MARGIN_S=f"{margin:g}",
    )
    stop = ctx.Event()
    hog_procs = [ctx.Process(target=_hog, args=(stop,), daemon=True) for _ in range(hogs)]
    for h in hog_procs:
        h.start()
    barrier = ctx.Barrier(processes + 1)
    out = ctx.Queue()
    clients = [
        ctx.Process(
            target=_client, args=(env, 1 + p * per, threads, seconds, barrier, out, switch_s)
        )
        for p in range(processes)
    ]
    load_start = os.getloadavg()[0]
    try:
        for c in clients:
            c.start()
        barrier.wait(timeout=120)
        records: list[dict[str, Any]] = []
        for _ in clients:
            records.extend(out.get(timeout=seconds + 120))
        for c in clients:
            c.join(timeout=30)
    finally:
        stop.set()
        for h in hog_procs:
            h.join(timeout=5)
        parent.send("stop")
        stamps = parent.recv()
        sim.join(timeout=10)
    for r in records:
        if r["openid"] in stamps:
            r["parse"], r["sim"], r["kernel"] = stamps[r["openid"]]
    result = {
        "rate": rate,
        "margin_s": margin,
        "seconds": seconds,
        "processes": processes,
        "threads": threads,
        "hogs": hogs,
        "switch_interval_s": switch_s,
        "loadavg_1m_at_start": round(load_start, 2),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        **analyse(records, rate),
    }
    flush_redis(REDIS_URL)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--margin", type=float, default=0.02)
    p.add_argument("--hogs", type=int, default=0)
    p.add_argument(
        "--switch-s", type=float, default=0.005, help="sys.setswitchinterval of every process"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = p.parse_args()
    result = run(
        args.rate, args.seconds, args.processes, args.threads, args.margin, args.hogs, args.switch_s
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        path = args.out if args.out.is_absolute() else RESULTS / args.out
        path.write_text(text + "\n")


if __name__ == "__main__":
    main()
