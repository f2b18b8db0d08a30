"""The interleaved timer: the order flips every round, one value per round per run, warm-up rounds untimed,
ratios per round, bad arguments refused; Rounds (one round per call, pytest-benchmark's target) does the same."""

import pytest

from benchmarks.interleave import Rounds, block, calls_for, interleave, ratio_stats


def test_order_flips_every_round_and_warmup_is_not_recorded():
    order = []
    values = {"base": iter([9.0, 1.0, 2.0, 3.0]), "ours": iter([9.0, 1.5, 2.5, 3.5])}

    def run(name):
        def r():
            order.append(name)
            return next(values[name])

        return r

    times = interleave({"base": run("base"), "ours": run("ours")}, repeats=3, warmup=1)
    assert order == ["base", "ours", "base", "ours", "ours", "base", "base", "ours"]
    assert times == {"base": [1.0, 2.0, 3.0], "ours": [1.5, 2.5, 3.5]}


def test_ratio_is_the_median_of_per_round_ratios():
    times = {"base": [1.0, 2.0, 10.0], "ours": [1.1, 2.4, 10.5]}
    med, lo, hi = ratio_stats(times, "ours", "base")
    assert (med, lo, hi) == pytest.approx((1.1, 1.05, 1.2))
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        ratio_stats({"base": [1.0], "ours": [1.0, 2.0]}, "ours", "base")


def test_block_and_calls_for():
    count = []
    per_call = block(lambda: count.append(1), 7)()
    assert len(count) == 7 and per_call >= 0
    n = calls_for(lambda: None, block_s=0.001, max_calls=50)
    assert 1 <= n <= 50
    with pytest.raises(ValueError, match="calls"):
        block(lambda: None, 0)
    with pytest.raises(ValueError, match="repeats"):
        interleave({"a": lambda: 1.0}, repeats=0)


def test_rounds_run_one_interleaved_round_per_call():
    order = []

    def run(name, value):
        def r():
            order.append(name)
            return value

        return r

    rounds = Rounds({"base": run("base", 1.0), "ours": run("ours", 2.0), "peft": run("peft", 3.0)})
    rounds(record=False)  # a warm-up round: runs every block, records nothing
    assert rounds.times == {"base": [], "ours": [], "peft": []}
    rounds()
    rounds()
    assert order == ["base", "ours", "peft", "base", "ours", "peft", "peft", "ours", "base"]
    assert rounds.times == {"base": [1.0, 1.0], "ours": [2.0, 2.0], "peft": [3.0, 3.0]}
    with pytest.raises(ValueError, match="no runs"):
        Rounds({})
