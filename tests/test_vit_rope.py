"""vit.rope: the model's RoPE built once (frequencies + plan), then one rotation per block per forward."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ndrope
from vit import ROPE_LAYOUT, RopePlan, create_rope
from vit.rope import keep_tokens

param = pytest.mark.parametrize
HEAD_DIM, HEADS, DEPTH, GRID = 16, 3, 2, (4, 5)  # P = 8, N = 20


def build(kind: str, **kwargs) -> tuple[ndrope.RotaryEmbedding, RopePlan]:
    torch.manual_seed(0)
    return create_rope(kind, head_dim=HEAD_DIM, num_heads=HEADS, depth=DEPTH, grid_size=GRID, **kwargs)


def rotations(rope: ndrope.RotaryEmbedding, plan: RopePlan, grid=GRID, keep=None, prefix: int = 1) -> list:
    return plan.rotations(rope, grid, mode="extrapolate", training=False, num_prefix_tokens=prefix, keep=keep)


class TestCreateRope:
    def test_axial_is_one_fixed_table_for_every_block(self):
        rope, plan = build("axial")
        assert not plan.per_block and not rope.learnable
        assert_close(rope.freqs, ndrope.axial_frequencies(HEAD_DIM, 2, theta=100.0), atol=0, rtol=0)
        tables = rotations(rope, plan)
        assert len(tables) == DEPTH and all(table is tables[0] for table in tables)
        assert tables[0][0].shape == (1 + 20, 8)

    def test_mixed_is_one_learned_table_per_block(self):
        """Block i rotates by heads i * H .. (i + 1) * H - 1 of the L * H learned frequencies."""
        rope, plan = build("mixed")
        assert plan.per_block and rope.learnable and rope.freqs.shape == (DEPTH * HEADS, 2, 8)
        for block, (cos, sin) in enumerate(rotations(rope, plan)):
            own = ndrope.RotaryEmbedding.from_frequencies(rope.freqs[block * HEADS : (block + 1) * HEADS].detach())
            assert_close((cos, sin), own.rotation(GRID, num_prefix_tokens=1), atol=0, rtol=0)

    def test_theta_sets_the_ladder(self):
        rope, _ = build("axial", theta=10000.0)
        assert_close(rope.freqs, ndrope.axial_frequencies(HEAD_DIM, 2, theta=10000.0), atol=0, rtol=0)
        assert rope.layout == ROPE_LAYOUT

    def test_head_dim_must_hold_a_pair_per_axis(self):
        with pytest.raises(ValueError, match="head_dim = embed_dim // num_heads = 6 must be even and at least 8"):
            create_rope("axial", head_dim=6, num_heads=1, depth=1, grid_size=(2, 2, 2, 2))


class TestRopePlan:
    def test_sharing_is_the_plans_choice_not_the_table_rank(self):
        """Per-head fixed frequencies give (H, k + N, P) tables; the plan says whether blocks share them."""
        per_head = ndrope.RotaryEmbedding.mixed(HEAD_DIM, 2, HEADS, learnable=False, layout=ROPE_LAYOUT)
        shared = rotations(per_head, RopePlan(depth=HEADS, per_block=False))
        assert len(shared) == HEADS and all(table is shared[0] for table in shared)
        assert shared[0][0].shape == (HEADS, 21, 8)
        split = rotations(per_head, RopePlan(depth=HEADS, per_block=True))
        assert [table[0].shape for table in split] == [(1, 21, 8)] * HEADS
        assert_close(split[1][0][0], shared[0][0][1], atol=0, rtol=0)

    @param("kind", ["axial", "mixed"])
    def test_kept_tokens_keep_their_own_rows(self, kind):
        rope, plan = build(kind)
        full = rotations(rope, plan)
        keep = torch.tensor([[0, 3, 7, 20], [0, 19, 1, 2]])  # B = 2: the prefix token and three patches each
        kept = rotations(rope, plan, keep=keep)
        heads = 1 if kind == "axial" else HEADS
        for (cos, sin), (full_cos, full_sin) in zip(kept, full):
            assert cos.shape == sin.shape == (2, heads, 4, 8)
            for b in range(2):
                assert_close(cos[b], full_cos[..., keep[b], :].expand(heads, -1, -1), atol=0, rtol=0)
                assert_close(sin[b], full_sin[..., keep[b], :].expand(heads, -1, -1), atol=0, rtol=0)

    def test_augmentation_draws_in_training_only(self):
        rope, plan = build("axial", shift=1.0, jitter=1.5)
        assert plan.augments and not build("axial")[1].augments
        plain = rotations(rope, plan)[0][0]
        drawn = plan.rotations(rope, GRID, mode="extrapolate", training=True, num_prefix_tokens=1)[0][0]
        assert (drawn - plain).abs().max() > 1e-3
        assert_close(drawn[0], torch.ones(8), atol=0, rtol=0)  # the prefix token stays unrotated


def test_keep_tokens_gathers_rows_per_sample():
    table = torch.arange(2 * 5 * 3.0).reshape(2, 5, 3)  # H, T, X
    index = torch.tensor([[4, 0], [1, 1], [2, 3]])  # B = 3, M = 2
    kept = keep_tokens(table, index)
    assert kept.shape == (3, 2, 2, 3)
    for b in range(3):
        assert_close(kept[b], table[:, index[b]], atol=0, rtol=0)
    batched = keep_tokens(kept.transpose(-1, -2).contiguous(), torch.tensor([[0, 2], [1, 0], [2, 2]]), has_batch=True)
    assert_close(batched[1], kept[1].transpose(-1, -2)[:, [1, 0]], atol=0, rtol=0)
