"""A stand-in for the Midas endpoints (PRODUCT.md §9), for tests, benchmarks, the demo and staging.

    sim = Simulator(SimConfig(rate_limit=50, players=1000))
    base_url = sim.start()          # a real threaded HTTP/1.1 server on a free loopback port
    ...
    sim.stop()

Midas endpoints (midas/API.md): ``POST /cgi-bin/midas/{getbalance,pay,cancelpay,present}``
and the same under ``/cgi-bin/midas/sandbox/`` (v1; the path picks the environment and its
AppKey), ``POST /wxa/game/{getbalance,pay,cancelpay,present}`` (v2; the body's ``env`` does),
``POST /cgi-bin/stable_token`` and ``GET /cgi-bin/token``. Every signature is verified as
WeChat does, with the real error codes; counters follow `worker.simulator.state`.

v2 bodies: pay ``amount, order_id``; cancelpay ``pay_order_id`` (the pay's order_id),
``order_id`` (the cancel's own) and optionally ``amount``; present ``amount, order_id``.

Faults (`Simulator.inject(kind, count=N | rate=P, path=prefix)`, by default the next request
to any Midas endpoint): ``minus1``, ``quota_minute`` (45011), ``quota_day`` (45009) and
``token_expired`` (42001) replace the answer and nothing moves; ``timeout``, ``http500``,
``malformed_json`` and ``truncated`` spoil the answer after the request was handled (a pay
has happened, as with a lost answer); ``wrong_types``, ``negative`` and ``huge`` corrupt the
numbers of an ok answer that carries a balance.

Statistics (`Simulator.stats`): ``requests`` and ``by_path`` count every request except the
control ones; ``by_errcode`` the errcodes of the JSON answers delivered (0 for a token);
``max_per_second`` the most Midas-endpoint arrivals in any sliding one-second window (the
45011 rule counts the same windows); ``token_calls``; plus ``faults`` (fired, by kind),
``force_refresh_calls`` and ``connections`` (TCP connections accepted). `arrivals()` gives
the sorted ``time.monotonic()`` arrival times (the latest ``max_recorded_arrivals``). With
``SimConfig(kernel_stamps=True)`` (Linux), `arrival_stamps()` also gives, per Midas arrival, the
kernel's receive time of its first bytes next to the handler's time (unix seconds): the clock a
remote Midas would count by, without this process's own scheduling.

Control endpoints for a simulator in another process (JSON in and out): ``GET /__sim/stats``,
``GET /__sim/arrivals?path_prefix=``, ``GET /__sim/arrival_stamps``, ``POST /__sim/reset_stats``,
``POST /__sim/faults``
``{kind, count | rate, path}``, ``DELETE /__sim/faults``, ``GET /__sim/players``,
``POST /__sim/players`` ``{openid, zone_id, save, present, cost, session_key}``,
``GET /__sim/counters?openid=&zone_id=``, ``GET /__sim/movements``, ``POST /__sim/move``
``{op: pay|present|save|cancelpay, openid, zone_id, amount, bill_no}`` (409 with the errcode
when Midas would refuse it), ``POST /__sim/session`` ``{openid, zone_id, session_key}``,
``POST /__sim/expire_session`` ``{openid, zone_id}``, ``POST /__sim/expire_tokens``,
``POST /__sim/token`` (a valid token, as a token service), ``POST /__sim/config``
``{rate_limit, latency_ms}``.
"""

from worker.simulator.config import FAULT_KINDS, SimConfig
from worker.simulator.server import Simulator
from worker.simulator.state import MoveRefused, max_per_window

__all__ = ["FAULT_KINDS", "MoveRefused", "SimConfig", "Simulator", "max_per_window"]
