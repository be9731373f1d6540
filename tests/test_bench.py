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


def test_gpu_targets_take_the_bandwidth_limit_in_bfloat16_and_the_best_gpu_peer():
    """On CUDA: bfloat16 forward within 1 / 0.85 of the copy bound's time (>= 0.85 of its bandwidth),
    float32 forward without a target, forward+backward against the faster of Liger and compiled rotate_half."""
    half = peers.NDROPE[0].name
    rows = [
        _row("llm", "bfloat16", "forward", peers.COPY.name, [1.0, 1.0, 1.0]),
        _row("llm", "bfloat16", "forward", half, [1.15, 1.2, 1.15]),
        _row("llm", "float32", "forward", peers.COPY.name, [1.0, 1.0, 1.0]),
        _row("llm", "float32", "forward", half, [3.0, 3.0, 3.0]),
        _row("llm", "bfloat16", "forward+backward", peers.LIGER.name, [2.0, 2.0, 2.0]),
        _row("llm", "bfloat16", "forward+backward", peers.COMPILED.name, [1.6, 1.6, 1.6]),
        _row("llm", "bfloat16", "forward+backward", peers.COMPLEX.name, [0.5, 0.5, 0.5]),  # not a GPU bound
        _row("llm", "bfloat16", "forward+backward", half, [1.7, 1.7, 1.7]),
    ]
    found = {(t["dtype"], t["passes"]): t for t in rotary.targets(rows, "cuda")}
    assert set(found) == {("bfloat16", "forward"), ("bfloat16", "forward+backward")}
    assert found[("bfloat16", "forward")]["ratio"] == pytest.approx(1.15) and found[("bfloat16", "forward")]["met"]
    backward = found[("bfloat16", "forward+backward")]
    assert backward["ratio"] == pytest.approx(1.7 / 1.6) and not backward["met"]
    assert peers.COMPLEX.name not in backward["versus"]


def test_compiled_choices_name_the_faster_one():
    kernel, formula = (peer.name for peer in peers.NDROPE_COMPILED)
    rows = [
        _row("video", "bfloat16", "forward", kernel, [1.0, 1.1, 1.0]),
        _row("video", "bfloat16", "forward", formula, [1.2, 1.2, 1.3]),
        _row("video", "bfloat16", "forward+backward", kernel, [3.0, 3.0, 3.0]),
        _row("video", "bfloat16", "forward+backward", formula, [2.0, 2.5, 2.0]),
    ]
    found = {c["passes"]: c for c in rotary.compiled_choices(rows)}
    assert found["forward"]["faster"] == "kernel" and found["forward"]["kernel_over_formula"] < 1
    assert found["forward+backward"]["faster"] == "formula"


def test_both_compiled_choices_agree_with_ndrope_and_compile_their_own_graphs():
    """The GPU bench's compiled ndrope peers, on CPU tensors: each choice is checked against the float64
    rotation (as every peer is before timing) and runs forward and backward."""
    import torch

    import ndrope

    torch.compiler.reset()
    theta = ndrope.angles(ndrope.grid((4, 4)), ndrope.axial_frequencies(32, 2))
    q, k = torch.randn(2, 3, 16, 32), torch.randn(2, 3, 16, 32)
    for peer in peers.NDROPE_COMPILED:
        apply = peer.make(theta, torch.float32)
        rotary._check(peer, apply, q, k, ndrope.cos_sin(theta))
        rotary._forward_backward(apply, q, k, torch.ones_like(q), torch.ones_like(k))()
    assert ndrope.set_compiled_rotation("kernel") == "kernel"  # each call restored the default


def test_timm_formula_swap_rotates_as_ndrope_does():
    """The GPU ViT step compares ndrope with the same model rotating by timm's formula: on a tiny vit the
    two give the same logits, and the swap is undone afterwards."""
    pytest.importorskip("timm")
    import torch

    import ndrope
    import vit
    from bench import vit_step

    torch.manual_seed(0)
    model = vit.NDRopeVisionTransformer("rope_axial", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    images = torch.randn(2, 3, 16, 16)
    reference = model(images)
    with vit_step._timm_rotation():
        assert ndrope.apply_rotary is not ndrope.functional.apply_rotary
        swapped = model(images)
    assert ndrope.apply_rotary is ndrope.functional.apply_rotary
    torch.testing.assert_close(swapped, reference, atol=1e-5, rtol=1e-5)


def test_cuda_device_is_refused_without_a_gpu(monkeypatch):
    import torch

    from bench.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is visible"):
        main(["--device", "cuda", "--skip-vit"])
    with pytest.raises(SystemExit, match="--shapes llm: not a cpu shape; choose from 1d,2d,3d"):
        main(["--shapes", "llm", "--skip-vit"])


def test_rotations_are_counted_per_tensor_single_or_paired():
    """The ViT bench's per-forward counts: `apply_rotary` is one rotation, `apply_rotary_pair` two."""
    import torch

    import ndrope
    from bench import vit_step

    rope = ndrope.RotaryEmbedding(16, n_axes=2)
    q = k = torch.randn(1, 2, 6, 16)
    counts: dict[str, int] = {}
    with vit_step._counting(counts):
        rotation = rope.rotation((2, 3))
        ndrope.apply_rotary(q, rotation)
        ndrope.apply_rotary_pair(q, k, rotation)
        rope(q.requires_grad_(), k, (2, 3))
    assert counts == {"angle tables": 2, "rotations": 5}
    assert ndrope._ops.rotate_pair is torch.ops.ndrope.rotate_pair.default  # restored
