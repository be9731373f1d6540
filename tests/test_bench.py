"""The benchmark's arithmetic (paired ratios, targets) and a tiny end-to-end run of its rotation part."""

from __future__ import annotations

import pytest

from bench import peers, rotary
from bench.timing import measure


def test_paired_ratio_takes_the_median_of_per_round_ratios_to_the_fastest_bound():
    mine = [2.0, 4.0, 6.0]
    bounds = [[1.0, 2.0, 3.0], [4.0, 1.0, 2.0]]  # two bounds, three rounds: fastest 1, 1, 2
    assert rotary.paired_ratio(mine, bounds) == pytest.approx(3.0)  # median of 2, 4, 3


def test_paired_ratio_ignores_a_slow_round_that_slowed_both():
    """A load spike that slows one round's cases alike leaves the paired ratio alone."""
    mine, copy = [1.1, 11.0, 1.1, 1.1, 1.1], [1.0, 10.0, 1.0, 1.0, 1.0]
    assert rotary.paired_ratio(mine, [copy]) == pytest.approx(1.1)


def _row(shape, dtype, passes, method, rounds):
    ms = sorted(rounds)[len(rounds) // 2]
    return dict(shape=shape, dtype=dtype, passes=passes, method=method, ms=ms, rounds_ms=rounds)


def test_targets_compare_forward_with_copy_and_backward_with_the_best_peer():
    half = peers.NDROPE[0].name
    rows = [
        _row("2d", "float32", "forward", peers.COPY.name, [1.0, 1.0, 1.0]),
        _row("2d", "float32", "forward", half, [1.2, 1.3, 1.2]),
        _row("2d", "float32", "forward+backward", peers.COMPLEX.name, [2.0, 2.0, 2.0]),
        _row("2d", "float32", "forward+backward", peers.COMPILED.name, [3.0, 1.5, 3.0]),
        _row("2d", "float32", "forward+backward", half, [1.8, 1.8, 1.8]),
    ]
    found = {t["passes"]: t for t in rotary.targets(rows)}
    assert found["forward"]["ratio"] == pytest.approx(1.2) and found["forward"]["met"]
    # rounds: 1.8 / 2.0, 1.8 / 1.5, 1.8 / 2.0 -> median 0.9, met; the ratio of medians is 1.8 / 2.0 too
    assert found["forward+backward"]["ratio"] == pytest.approx(0.9) and found["forward+backward"]["met"]
    rows[1] = _row("2d", "float32", "forward", half, [1.3, 1.3, 1.2])
    assert not {t["passes"]: t for t in rotary.targets(rows)}["forward"]["met"]


def test_measure_returns_every_round_and_rotates_the_order():
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    result = measure(cases, repeats=3, warmup=1)
    # settle + timed per case; round r starts with case r: abc, bca, cab, abc (1 warmup + 3 rounds)
    assert "".join(calls) == "aabbcc" + "bbccaa" + "ccaabb" + "aabbcc"
    assert [len(result[name]["rounds"]) for name in "abc"] == [3, 3, 3]
    assert result["a"]["min"] == min(result["a"]["rounds"])


def test_a_tiny_rotation_run_checks_every_peer_and_reports_targets(monkeypatch):
    """Every peer must agree with ndrope before it is timed; the run yields rows and targets."""
    pytest.importorskip("timm")
    pytest.importorskip("rotary_embedding_torch")
    monkeypatch.setitem(rotary.SHAPES, "tiny", ((2, 3, 16, 32), (4, 4)))
    rows = rotary.run(["tiny"], ["float32", "bfloat16"], repeats=2, compile_peer=False)
    methods = {r["method"] for r in rows}
    assert {peers.COPY.name, *(p.name for p in peers.NDROPE), peers.COMPLEX.name} <= methods
    assert all(len(r["rounds_ms"]) == 2 and r["ms"] > 0 for r in rows)
    found = rotary.targets(rows)
    assert {(t["dtype"], t["passes"]) for t in found} == {
        (d, p) for d in ("float32", "bfloat16") for p in ("forward", "forward+backward")
    }


def test_per_call_cost_is_measured_for_plain_and_recorded_calls():
    cost = rotary.per_call(repeats=20)
    assert set(cost) == {"apply_rotary_us", "apply_rotary_autograd_us", "copy_us"}
    assert all(value > 0 for value in cost.values())
