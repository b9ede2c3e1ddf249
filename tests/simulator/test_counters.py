"""Counters as pay, present, cancelpay and save move them, and a ledger that agrees."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from tests.simulator.conftest import OPENID, Api
from worker.simulator import MoveRefused, Simulator


def ledger_view(sim: Simulator) -> dict[tuple[str, str], dict[str, int]]:
    """PRODUCT.md §5's ledger side of each default check, from the simulator's movements."""
    sums: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for m in sim.movements():
        sums[(m["openid"], m["zone_id"])][m["kind"]] += m["amount"]
    return {
        key: {
            "save_sum": s["save"],
            "cost_sum": s["cost"] - s["cancel"],
            "present_sum": s["present"],
            "balance": s["save"] + s["present"] - s["cost"] + s["cancel"],
        }
        for key, s in sums.items()
    }


def test_gifts_are_spent_first_and_cancel_gives_the_same_split_back() -> None:
    sim = Simulator()
    sim.save("o1", "1", 100, "s1")
    sim.present("o1", "1", 30, "g1")
    after_pay = sim.pay("o1", "1", 50, "p1")
    assert after_pay == {
        "balance": 80,
        "gen_balance": 0,  # the 30 gifted coins went first
        "first_save": True,
        "save_amt": 100,
        "save_sum": 100,
        "cost_sum": 50,
        "present_sum": 30,
    }
    after_cancel = sim.cancelpay("o1", "1", "p1")
    assert after_cancel["balance"] == 130
    assert after_cancel["gen_balance"] == 30
    assert after_cancel["cost_sum"] == 0


def test_pay_is_idempotent_by_bill_no() -> None:
    sim = Simulator()
    sim.save("o1", "1", 100, "s1")
    first = sim.pay("o1", "1", 40, "p1")
    assert sim.pay("o1", "1", 40, "p1") == first  # a replay moves nothing
    with pytest.raises(MoveRefused) as refused:
        sim.pay("o1", "1", 41, "p1")
    assert refused.value.errcode == 90012
    with pytest.raises(MoveRefused) as refused:
        sim.present("o1", "1", 40, "p1")  # one bill_no space, as in the ledger
    assert refused.value.errcode == 90012
    assert sim.counters("o1")["cost_sum"] == 40


def test_refusals_change_nothing() -> None:
    sim = Simulator()
    sim.save("o1", "1", 100, "s1")
    before = sim.counters("o1")
    cases = [
        (lambda: sim.pay("o1", "1", 101, "p1"), 90013),
        (lambda: sim.pay("o-nobody", "1", 1, "p2"), 90013),
        (lambda: sim.pay("o1", "1", 0, "p3"), 90018),
        (lambda: sim.pay("o1", "1", -5, "p4"), 90018),
        (lambda: sim.save("o1", "1", True, "p5"), 90018),
        (lambda: sim.save("o1", "1", 10**13, "p6"), 90018),
        (lambda: sim.cancelpay("o1", "1", "never-paid"), 90000),
        (lambda: sim.cancelpay("o1", "1", "s1"), 90000),  # a save is not a pay
    ]
    for move, errcode in cases:
        with pytest.raises(MoveRefused) as refused:
            move()
        assert refused.value.errcode == errcode
    assert sim.counters("o1") == before
    assert len(sim.movements()) == 1


def test_cancelpay_twice_is_90015_and_only_for_the_payer() -> None:
    sim = Simulator()
    sim.save("o1", "1", 100, "s1")
    sim.pay("o1", "1", 10, "p1")
    with pytest.raises(MoveRefused) as refused:
        sim.cancelpay("o2", "1", "p1")
    assert refused.value.errcode == 90000
    sim.cancelpay("o1", "1", "p1")
    with pytest.raises(MoveRefused) as refused:
        sim.cancelpay("o1", "1", "p1")
    assert refused.value.errcode == 90015


def test_add_player_totals_and_checks() -> None:
    sim = Simulator()
    sim.add_player("o1", save=500, present=50, cost=80, session_key="a2V5")
    assert sim.counters("o1") == {
        "balance": 470,
        "gen_balance": 0,
        "first_save": True,
        "save_amt": 500,
        "save_sum": 500,
        "cost_sum": 80,
        "present_sum": 50,
    }
    sim.add_player("o2", present=50, cost=20)
    assert sim.counters("o2")["gen_balance"] == 30
    assert sim.counters("o2")["first_save"] is False
    with pytest.raises(ValueError, match="exists"):
        sim.add_player("o1")  # nothing is silently overwritten
    with pytest.raises(ValueError, match="negative"):
        sim.add_player("o3", save=10, cost=11)
    with pytest.raises(ValueError):
        sim.add_player("o4", save=-1)
    with pytest.raises(KeyError):
        sim.counters("o-unknown")


def test_random_movements_agree_with_a_ledger_built_from_them() -> None:
    sim = Simulator()
    rng = random.Random(5)
    players = [f"o{i}" for i in range(5)]
    paid: list[tuple[str, str]] = []
    for n in range(400):
        who = rng.choice(players)
        op = rng.choice(["save", "present", "pay", "pay", "cancel"])
        try:
            if op == "save":
                sim.save(who, "1", rng.randint(1, 500), f"b{n}")
            elif op == "present":
                sim.present(who, "1", rng.randint(1, 100), f"b{n}")
            elif op == "pay":
                sim.pay(who, "1", rng.randint(1, 300), f"b{n}")
                paid.append((who, f"b{n}"))
            elif paid:
                payer, bill_no = paid.pop(rng.randrange(len(paid)))
                sim.cancelpay(payer, "1", bill_no)
        except MoveRefused as exc:
            assert exc.errcode == 90013
    ledger = ledger_view(sim)
    kinds = {m["kind"] for m in sim.movements()}
    assert kinds == {"save", "present", "cost", "cancel"}
    for openid in players:
        counters = sim.counters(openid)
        assert {k: counters[k] for k in ledger[(openid, "1")]} == ledger[(openid, "1")]
        assert 0 <= counters["gen_balance"] <= counters["balance"]
        assert counters["save_amt"] == counters["save_sum"]


@pytest.mark.integration
def test_v1_pay_present_cancelpay_over_http(api: Api, sim: Simulator) -> None:
    pay = api.v1("pay", api.v1_params(amt=150, bill_no="pay-1"))
    assert pay == {
        "errcode": 0,
        "errmsg": "ok",
        "bill_no": "pay-1",
        "balance": 950,
        "used_gen_amt": 100,
    }
    assert api.v1("pay", api.v1_params(amt=150, bill_no="pay-1")) == pay  # replay
    assert api.v1("pay", api.v1_params(amt=151, bill_no="pay-1"))["errcode"] == 90012
    assert api.v1("pay", api.v1_params(amt=10_000, bill_no="pay-2"))["errcode"] == 90013
    present = api.v1("present", api.v1_params(present_counts=20, bill_no="gift-1"))
    assert present == {"errcode": 0, "errmsg": "ok", "balance": 970, "bill_no": "gift-1"}
    assert api.v1("cancelpay", api.v1_params(bill_no="pay-1")) == {
        "errcode": 0,
        "errmsg": "ok",
        "bill_no": "pay-1",
    }
    assert api.v1("cancelpay", api.v1_params(bill_no="pay-1"))["errcode"] == 90015
    assert api.v1("cancelpay", api.v1_params(bill_no="nope"))["errcode"] == 90000
    assert api.v1("pay", api.v1_params(amt=0, bill_no="pay-3"))["errcode"] == 90018
    assert api.v1("pay", api.v1_params(bill_no="pay-4"))["errcode"] == 40101  # no amt
    balance = api.v1("getbalance")
    assert balance["balance"] == 1120
    assert balance["gen_balance"] == 120
    assert balance["cost_sum"] == 0
    assert balance["present_sum"] == 120
    ledger = ledger_view(sim)[(OPENID, "1")]
    # The fixture's player started with save 1000 and present 100 outside any movement.
    assert ledger == {"save_sum": 0, "cost_sum": 0, "present_sum": 20, "balance": 20}
    assert [m["kind"] for m in sim.movements()] == ["cost", "present", "cancel"]
