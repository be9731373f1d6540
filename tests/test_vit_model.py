"""NDRopeVisionTransformer: every pos_embed at every resolution, position properties, checkpoints, N-D, errors."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from rope_reference import even_split
from torch import nn
from torch.testing import assert_close

import ndrope
import vit
from vit import POS_EMBED_CHOICES, NDRopeVisionTransformer

param = pytest.mark.parametrize
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5)
ROPE_CHOICES = ("rope_axial", "rope_mixed")
# 0.75x, 1x, 1.5x, 2x the 32 px training size, and a non-square one; all multiples of the 4 px patch
SIZES = ((24, 24), (32, 32), (48, 48), (64, 64), (24, 40))


def tiny(pos_embed: str, seed: int = 0, **overrides) -> vit.NDRopeVisionTransformer:
    torch.manual_seed(seed)
    return NDRopeVisionTransformer(pos_embed, **{**TINY, **overrides}).eval()


def images(*size: int, batch: int = 2, channels: int = 3, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def permute_patches(x: torch.Tensor, patch: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder the (patch x patch) blocks of images (B, C, h, w) row-major by ``order``."""
    B, C, h, w = x.shape
    blocks = x.reshape(B, C, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)
    blocks = blocks[:, order].unflatten(1, (h // patch, w // patch))
    return blocks.permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


class TestAnyResolution:
    @param("pos_embed", POS_EMBED_CHOICES)
    def test_forward_at_every_size(self, pos_embed):
        """Logits are finite, input-dependent and per-sample at sizes other than the training size."""
        model = tiny(pos_embed)
        for size in SIZES:
            x = images(*size)
            out = model(x)
            assert out.shape == (2, TINY["num_classes"]), (pos_embed, size)
            assert torch.isfinite(out).all(), (pos_embed, size)
            assert (out[0] - out[1]).abs().max() > 1e-4, f"{pos_embed} at {size}: output ignores the input"
            assert_close(model(x[:1]), out[:1], atol=1e-5, rtol=1e-5)

    @param("size", [(32, 32), (48, 40)])
    @param("pos_embed", POS_EMBED_CHOICES)
    def test_backward(self, pos_embed, size):
        """Every parameter, the position parameters included, gets a finite non-zero gradient."""
        model = tiny(pos_embed).train()
        model(images(*size)).square().sum().backward()
        names = {name for name, _ in model.named_parameters()}
        if "learned" in pos_embed:
            assert "pos_embed" in names
        if "mixed" in pos_embed:
            assert "rope.freqs" in names
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} received no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
            assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"


class TestPositionInformation:
    def test_none_is_invariant_to_patch_order(self):
        """Without positions, average pooling makes the output blind to the order of the patches."""
        model = tiny("none", global_pool="avg").double()
        x = images(32, 32, dtype=torch.float64)
        order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
        assert_close(model(permute_patches(x, 4, order)), model(x), atol=1e-10, rtol=1e-10)

    @param("pos_embed", [p for p in POS_EMBED_CHOICES if p != "none"])
    def test_other_encodings_see_patch_order(self, pos_embed):
        model = tiny(pos_embed, global_pool="avg").double()
        x = images(32, 32, dtype=torch.float64)
        order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
        out, permuted = model(x), model(permute_patches(x, 4, order))
        # "none" agrees to 1e-10 above; a freshly initialised learned table (std 0.02) moves logits ~1e-4
        assert (out - permuted).abs().max() > 1e-6, f"{pos_embed} is blind to patch order"

    def test_a_constant_over_channels_is_invisible(self, monkeypatch):
        """Why "integer" alternates its sign: the same number in every channel is removed by every
        LayerNorm of the pre-norm ViT, so the output equals that of "none"."""
        x = images(40, 40, dtype=torch.float64)
        reference = tiny("none", global_pool="avg").double()(x)
        model = tiny("integer", global_pool="avg").double()
        assert (model(x) - reference).abs().max() > 1e-6
        same_in_every_channel = vit.integer_embed((10, 10), 1).expand(-1, 48)  # N, C
        monkeypatch.setattr(model.fixed_pos_embed, "forward", lambda grid, device: same_in_every_channel)
        assert_close(model(x), reference, atol=1e-12, rtol=1e-12)

    @param("pos_embed", ROPE_CHOICES)
    def test_rope_logits_depend_only_on_offset(self, pos_embed):
        """q_i . k_j between patch tokens with fixed contents is the same for any (i, j) with the same offset."""
        model = tiny(pos_embed).double()
        attn, grid = model.blocks[1].attn, (8, 8)
        rope = model.rotary_tables(grid)[1]
        k = model.num_prefix_tokens

        def token(row: int, col: int) -> int:
            return k + row * grid[1] + col

        content = torch.randn(2, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        x = torch.randn(1, k + 64, 48, dtype=torch.float64)
        pairs = [((1, 2), (3, 5)), ((4, 3), (6, 6)), ((5, 0), (7, 3))]  # offset (2, 3) each time
        for query, key in pairs:
            x[0, token(*query)], x[0, token(*key)] = content[0], content[1]
        x[0, token(0, 0)] = content[1]  # offset (-1, -2) from query (1, 2): a different logit
        q, kk, _ = attn.project_qkv(x, rope)
        logits = q @ kk.transpose(-2, -1)  # 1, H, N, N
        reference = logits[0, :, token(1, 2), token(3, 5)]
        for query, key in pairs[1:]:
            assert_close(logits[0, :, token(*query), token(*key)], reference, atol=1e-12, rtol=1e-10)
        assert (logits[0, :, token(1, 2), token(0, 0)] - reference).abs().max() > 1e-3

    @param("pos_embed", ROPE_CHOICES)
    def test_rope_ignores_a_common_shift_without_prefix_tokens(self, pos_embed):
        """Adding one offset to every patch position (train-time shift augmentation) leaves the output
        unchanged when no token is unrotated; with a class token (absolute reference) it does not."""
        for class_token, invariant in ((False, True), (True, False)):
            pool = "avg" if not class_token else "token"
            model = tiny(pos_embed, class_token=class_token, global_pool=pool, rope_shift=5.0).double()
            x = images(32, 32, dtype=torch.float64)
            reference = model(x)  # eval: no augmentation; in training positions += U(-5, 5) per axis
            torch.manual_seed(0)
            shifted = model.train()(x)
            if invariant:
                assert_close(shifted, reference, atol=1e-9, rtol=1e-9)
            else:
                assert (shifted - reference).abs().max() > 1e-6


class TestResolutionMode:
    @param("pos_embed", ROPE_CHOICES)
    def test_modes_agree_on_the_training_grid_only(self, pos_embed):
        model = tiny(pos_embed)
        outputs = {}
        for mode in ndrope.RESOLUTION_MODES:
            model.set_resolution_mode(mode)
            outputs[mode] = (model(images(32, 32)), model(images(64, 64)))
        for mode in ("interpolate", "ntk"):
            assert_close(outputs[mode][0], outputs["extrapolate"][0], atol=1e-6, rtol=1e-6)
            assert (outputs[mode][1] - outputs["extrapolate"][1]).abs().max() > 1e-5, mode

    def test_interpolate_puts_a_finer_grid_on_the_training_positions(self):
        """At twice the grid, patch (2i, 2j) gets the rotation of training patch (i, j)."""
        model = tiny("rope_axial", rope_resolution_mode="interpolate")
        cos8, sin8 = model.rotary_tables((8, 8))[0]
        cos16, sin16 = model.rotary_tables((16, 16))[0]
        k = model.num_prefix_tokens
        even = (torch.arange(8)[:, None] * 2 * 16 + torch.arange(8)[None, :] * 2).flatten() + k
        assert_close(cos16[even], cos8[k:], atol=1e-6, rtol=0)
        assert_close(sin16[even], sin8[k:], atol=1e-6, rtol=0)

    @param("mode", ["interpolate", "ntk"])
    def test_constructor_argument_equals_setter(self, mode):
        built = tiny("rope_mixed", rope_resolution_mode=mode)
        switched = tiny("rope_mixed")
        switched.set_resolution_mode(mode)
        assert built.rope_resolution_mode == switched.rope_resolution_mode == mode
        assert_close(built(images(48, 48)), switched(images(48, 48)), atol=0, rtol=0)

    def test_the_setter_is_the_only_way_to_change_it(self):
        model = tiny("rope_axial")
        with pytest.raises(AttributeError):
            model.rope_resolution_mode = "ntk"
        assert model.rope_resolution_mode == vit.DEFAULT_RESOLUTION_MODE
        assert not hasattr(vit, "set_resolution_mode") and not hasattr(vit, "create_vit")

    def test_default_is_the_module_constant(self):
        assert tiny("rope_axial").rope_resolution_mode == vit.DEFAULT_RESOLUTION_MODE
        assert tiny("rope_axial+learned").rope_resolution_mode == vit.DEFAULT_RESOLUTION_MODE

    @param("pos_embed", ["learned", "sincos", "alibi", "none"])
    def test_a_model_without_rope_has_no_mode_to_set(self, pos_embed):
        model = tiny(pos_embed)
        assert model.rope_resolution_mode is None and vit.applicable_resolution_modes(pos_embed) == ()
        with pytest.raises(ValueError, match=rf"rope_resolution_mode='ntk' does not apply to pos_embed='{pos_embed}': it has no RoPE"):
            model.set_resolution_mode("ntk")
        with pytest.raises(ValueError, match="rope_resolution_mode='extrapolate' does not apply"):
            tiny(pos_embed, rope_resolution_mode="extrapolate")

    @param("pos_embed", ROPE_CHOICES)
    def test_every_mode_applies_to_rope_on_grid_indices(self, pos_embed):
        assert vit.applicable_resolution_modes(pos_embed) == ndrope.RESOLUTION_MODES
        assert vit.applicable_resolution_modes(pos_embed, rope_recipe="dinov3") == ()


class TestAttnLogitScale:
    """attn_logit_scale="log-length": the logits of a sequence of n = k + N tokens times log(n) / log(n_train)."""

    def test_identity_at_the_training_grid(self):
        model = tiny("rope_mixed", attn_logit_scale="log-length")
        assert_close(model(images(32, 32)), tiny("rope_mixed")(images(32, 32)), atol=0, rtol=0)

    @param("size", [(48, 40), (24, 24)])
    @param("pos_embed", ["rope_axial", "alibi", "learned"])
    def test_is_a_factor_on_every_attention_softmax_temperature(self, pos_embed, size):
        """Against an independent reference: the plain model whose matmul path scales q by D^-0.5 times
        log(k + N) / log(k + N_train), prefix tokens counted (reg_tokens=1: k = 2)."""
        model = tiny(pos_embed, reg_tokens=1, attn_logit_scale="log-length").double()
        reference = tiny(pos_embed, reg_tokens=1).double()
        n = 2 + (size[0] // 4) * (size[1] // 4)
        factor = math.log(n) / math.log(2 + 64)
        for block in reference.blocks:
            block.attn.fused_attn = False
            block.attn.scale = block.attn.scale * factor
        x = images(*size, dtype=torch.float64)
        assert_close(model(x), reference(x), atol=1e-12, rtol=1e-12)
        assert (model(x) - tiny(pos_embed, reg_tokens=1).double()(x)).abs().max() > 1e-6

    @param("pos_embed", POS_EMBED_CHOICES)
    def test_every_pos_embed_takes_it(self, pos_embed):
        """Attention thins out over more keys whatever encodes the positions: no pos_embed refuses it, and
        every block gets the factor (nothing at the training grid)."""
        model = tiny(pos_embed, attn_logit_scale="log-length")
        seen = []
        for block in model.blocks:
            block.attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["logit_scale"]), with_kwargs=True)
        model(images(48, 48))
        model(images(32, 32))
        assert seen == [pytest.approx(math.log(1 + 144) / math.log(1 + 64), rel=1e-12)] * 2 + [None] * 2

    def test_constructor_argument_equals_setter(self):
        built, switched = tiny("rope_axial", attn_logit_scale="log-length"), tiny("rope_axial")
        assert switched.attn_logit_scale == "none"
        switched.set_attn_logit_scale("log-length")
        assert built.attn_logit_scale == switched.attn_logit_scale == "log-length"
        assert_close(built(images(48, 48)), switched(images(48, 48)), atol=0, rtol=0)
        with pytest.raises(AttributeError):
            built.attn_logit_scale = "none"

    def test_patch_dropout_counts_the_kept_tokens(self):
        model = tiny("rope_axial", patch_drop_rate=0.5, attn_logit_scale="log-length").train()
        seen = []
        model.blocks[0].attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["logit_scale"]), with_kwargs=True)
        model(images(32, 32))
        assert seen == [pytest.approx(math.log(1 + 32) / math.log(1 + 64), rel=1e-12)]

    def test_bad_values_name_the_argument(self):
        with pytest.raises(ValueError, match=r"attn_logit_scale='log_length' is not supported; choose one of \['none', 'log-length'\]"):
            tiny("rope_axial", attn_logit_scale="log_length")
        with pytest.raises(ValueError, match="attn_logit_scale=True is not supported"):
            tiny("learned").set_attn_logit_scale(True)
        one_token = dict(TINY, img_size=4, class_token=False, global_pool="avg")
        with pytest.raises(ValueError, match=r"attn_logit_scale='log-length' needs at least 2 tokens.*has 1"):
            NDRopeVisionTransformer("rope_axial", attn_logit_scale="log-length", **one_token)


class TestMultiResolutionTraining:
    """A model trained at several grids: positions follow each grid, the configured img_size stays the reference."""

    @param("pos_embed", ["learned", "rope_axial", "rope_mixed+learned", "sincos", "alibi"])
    def test_steps_at_several_sizes_train_every_parameter(self, pos_embed):
        model = tiny(pos_embed, rope_resolution_mode="interpolate" if "rope" in pos_embed else None).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        table_shape = model.pos_embed.shape if model.pos_embed is not None else None
        for step, size in enumerate((24, 40, 32, 48)):
            optimizer.zero_grad()
            loss = model(images(size, size, seed=step)).logsumexp(-1).mean()
            loss.backward()
            assert torch.isfinite(loss), (pos_embed, size)
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().max() > 0, f"{name} got no gradient at {size}px"
            optimizer.step()
        assert tuple(model.patch_embed.img_size) == (32, 32) and tuple(model.patch_embed.grid_size) == (8, 8)
        if table_shape is not None:
            assert model.pos_embed.shape == table_shape  # resampled per forward, never resized
        if model.rope is not None:
            assert model.rope.reference_shape == (8, 8)

    @param("mode", ["interpolate", "ntk", "extrapolate"])
    def test_training_positions_follow_the_grid_relative_to_img_size(self, mode):
        """In training, a 10 x 10 grid gets the positions evaluation gives it: by the mode, relative to 8 x 8."""
        model = tiny("rope_axial", rope_resolution_mode=mode).train()
        trained = model.rotary_tables((10, 10))[0]
        reference = (8, 8) if mode == "interpolate" else None
        positions = ndrope.grid((10, 10), reference_shape=reference)
        freqs = model.rope.frequencies((10, 10), mode=mode)
        expected = ndrope.RotaryEmbedding.from_frequencies(freqs, layout=vit.ROPE_LAYOUT).rotation(positions, num_prefix_tokens=1)
        assert_close(trained, expected, atol=1e-6, rtol=0)
        assert_close(trained, model.eval().rotary_tables((10, 10))[0], atol=0, rtol=0)

    def test_a_learned_table_is_resampled_to_each_training_grid(self):
        model = tiny("learned").train()
        tokens = {}
        model.pos_drop.register_forward_hook(lambda m, args, out: tokens.update(x=args[0]))
        x = images(40, 40)
        model(x)
        patches = model.patch_embed(x).flatten(1, 2)
        table = vit.resample_pos_embed(model.pos_embed, (10, 10), (8, 8), num_prefix_tokens=1)
        assert_close(tokens["x"][:, 1:], patches + table[:, 1:], atol=1e-6, rtol=1e-6)


class TestRopeAugmentation:
    """rope_shift / rope_jitter / rope_rescale: DINOv3's coordinate augmentation, in training only."""

    AUG = dict(rope_shift=1.0, rope_jitter=1.5, rope_rescale=2.0)

    @param("pos_embed", ROPE_CHOICES)
    def test_active_in_training_only(self, pos_embed):
        model = tiny(pos_embed, **self.AUG)
        x = images(32, 32)
        assert not model.augments_positions
        assert_close(model(x), tiny(pos_embed)(x), atol=0, rtol=0)  # eval: exactly the plain model
        model.train()
        assert model.augments_positions
        assert (model(x) - model(x)).abs().max() > 1e-5  # a new draw every forward
        assert not tiny(pos_embed).train().augments_positions  # off by default

    @param("mode", ["extrapolate", "interpolate"])
    def test_tables_are_ndrope_augment_positions_of_the_grid(self, mode):
        model = tiny("rope_axial", rope_resolution_mode=mode, **self.AUG).train()
        torch.manual_seed(3)
        cos, sin = model.rotary_tables((12, 12))[0]
        torch.manual_seed(3)
        positions = ndrope.augment_positions(
            model.rope.positions((12, 12), mode=mode), shift=1.0, jitter=1.5, rescale=2.0
        )
        expected = model.rope.rotation(positions, num_prefix_tokens=1)
        assert_close((cos, sin), expected, atol=0, rtol=0)
        plain = model.eval().rotary_tables((12, 12))[0]
        assert (cos - plain[0]).abs().max() > 1e-3

    def test_mixed_tables_stay_differentiable(self):
        model = tiny("rope_mixed", **self.AUG).train()
        model(images(32, 32)).sum().backward()
        assert model.rope.freqs.grad is not None and model.rope.freqs.grad.abs().max() > 0


class TestTables:
    def test_axial_table_is_shared_and_mixed_is_per_layer(self):
        axial = tiny("rope_axial", depth=3).rotary_tables((8, 8))
        assert all(t is axial[0] for t in axial) and axial[0][0].shape == (1 + 64, 8)
        mixed = tiny("rope_mixed", depth=3).rotary_tables((8, 8))
        assert len(mixed) == 3 and mixed[0][0].shape == (3, 1 + 64, 8)
        assert (mixed[0][0] - mixed[1][0]).abs().max() > 1e-3  # independent frequencies per layer

    @param("pos_embed", ROPE_CHOICES)
    def test_prefix_tokens_are_not_rotated(self, pos_embed):
        model = tiny(pos_embed, reg_tokens=2)
        for cos, sin in model.rotary_tables((6, 6)):
            assert_close(cos[..., :3, :], torch.ones_like(cos[..., :3, :]), atol=0, rtol=0)
            assert_close(sin[..., :3, :], torch.zeros_like(sin[..., :3, :]), atol=0, rtol=0)

    def test_rope_theta_defaults_and_override(self):
        assert vit.ROPE_THETA["axial"] == 100.0 and vit.ROPE_THETA["mixed"] == 10.0
        for theta, kwargs in ((100.0, {}), (10000.0, dict(rope_theta=10000.0))):
            expected = ndrope.axial_frequencies(16, 2, theta=theta)  # head_dim 16
            assert_close(tiny("rope_axial", **kwargs).rope.freqs, expected, atol=0, rtol=0)
        ladder = 10.0 ** (-torch.arange(4, dtype=torch.float64) / 4)  # per direction: 4 pairs, theta 10
        norms = tiny("rope_mixed").rope.freqs.detach().double().norm(dim=1)  # L * H, P
        assert_close(norms, torch.cat((ladder, ladder)).expand(6, -1), atol=1e-6, rtol=1e-6)

    def test_alibi_bias_is_shared_and_spares_prefix_tokens(self):
        model = tiny("alibi", reg_tokens=1)
        bias = model.attention_bias((4, 4))
        assert bias.shape == (3, 2 + 16, 2 + 16)
        assert_close(bias[:, :2], torch.zeros_like(bias[:, :2]), atol=0, rtol=0)
        assert_close(bias[:, 2 + 0, 2 + 5], -vit.alibi_slopes(3) * math.sqrt(2), atol=1e-6, rtol=1e-6)

    def test_mixed_frequencies_skip_weight_decay(self):
        assert {"rope.freqs", "pos_embed", "cls_token"} <= tiny("rope_mixed+learned").no_weight_decay()


class TestCheckpoints:
    @param("pos_embed", POS_EMBED_CHOICES)
    def test_state_dict_round_trip(self, pos_embed):
        source, target = tiny(pos_embed, seed=0), tiny(pos_embed, seed=1)
        target.load_state_dict(source.state_dict())
        x = images(48, 48)
        assert_close(target(x), source(x), atol=0, rtol=0)

    def test_state_dict_holds_only_learned_position_state(self):
        # fixed frequencies: only the record of their settings, checked on load
        assert [key for key in tiny("rope_axial").state_dict() if key.startswith("rope.")] == ["rope._extra_state"]
        assert tiny("rope_mixed").state_dict()["rope.freqs"].shape == (2 * 3, 2, 8)  # L * H, A, P

    @param("no_embed_class", [False, True])
    def test_plain_timm_vit_loads_into_learned(self, no_embed_class):
        """Same state dict keys; identical outputs at the training size and, against timm's
        dynamic_img_size ViT, at another size."""
        config = dict(TINY, reg_tokens=1, no_embed_class=no_embed_class)
        torch.manual_seed(0)
        reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **config).eval()
        dynamic = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, **config).eval()
        dynamic.load_state_dict(reference.state_dict())
        model = tiny("learned", seed=1, reg_tokens=1, no_embed_class=no_embed_class)
        model.load_state_dict(reference.state_dict())
        assert_close(model(images(32, 32)), reference(images(32, 32)), atol=1e-6, rtol=1e-6)
        assert_close(model(images(48, 40)), dynamic(images(48, 40)), atol=1e-6, rtol=1e-6)

    def test_plain_timm_vit_loads_into_rope_axial_learned(self):
        reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
        tiny("rope_axial+learned").load_state_dict(reference.state_dict())  # strict: same keys


class TestNDim:
    CASES = {
        1: dict(img_size=32, patch_size=4, test_size=(48,)),
        3: dict(img_size=(4, 16, 16), patch_size=(2, 4, 4), test_size=(6, 8, 12)),
        4: dict(img_size=(2, 4, 8, 8), patch_size=(1, 2, 4, 4), test_size=(3, 2, 12, 4)),
    }

    @param("pos_embed", POS_EMBED_CHOICES)
    @param("ndim", [1, 3, 4])
    def test_forward_backward(self, ndim, pos_embed):
        case = dict(self.CASES[ndim])
        test_size = case.pop("test_size")
        model = tiny(pos_embed, ndim=ndim, **case).train()
        train_size = case["img_size"] if ndim > 1 else (case["img_size"],)
        for size in (train_size, test_size):
            out = model(images(*size))
            assert out.shape == (2, TINY["num_classes"]) and torch.isfinite(out).all(), (ndim, pos_embed, size)
            out.square().sum().backward()
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: missing or non-finite grad"
                assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient at {size}"
            model.zero_grad()

    @param("ndim", [3, 4])
    def test_time_shift_only_rotates_time_channels(self, ndim):
        """Axial RoPE is separable: moving tokens along time changes only the time pairs of q."""
        case = dict(self.CASES[ndim])
        case.pop("test_size")
        model = tiny("rope_axial", ndim=ndim, **case).double()
        pairs = even_split(16 // 2, ndim)  # head_dim 16
        time_pairs = torch.zeros(8, dtype=torch.bool)
        time_pairs[: pairs[0]] = True
        positions = model.rope.positions(model.patch_embed.grid_size).double()
        step = torch.zeros(ndim, dtype=torch.float64)
        step[0] = 1.0
        before, after = ndrope.angles(positions, model.rope.freqs), ndrope.angles(positions + step, model.rope.freqs)
        assert (after - before)[:, time_pairs].abs().min() > 1e-3
        assert_close(after[:, ~time_pairs], before[:, ~time_pairs], atol=0, rtol=0)
        q = torch.randn(1, 3, positions.shape[0], 16, dtype=torch.float64)
        layout = model.rope.layout
        moved = ndrope.apply_rotary(q, after, layout=layout) - ndrope.apply_rotary(q, before, layout=layout)
        time_channels = torch.cat((time_pairs, time_pairs))  # "half" layout: pair j is channels j and j + 8
        assert moved[..., time_channels].abs().max() > 1e-3
        assert_close(moved[..., ~time_channels], torch.zeros_like(moved[..., ~time_channels]), atol=0, rtol=0)

    def test_video_uses_the_nd_patch_embedding(self):
        model = tiny("rope_mixed", ndim=3, img_size=(4, 16, 16), patch_size=(2, 4, 4))
        assert isinstance(model.patch_embed, vit.PatchEmbedND) and model.patch_embed.grid_size == (2, 4, 4)
        assert model.rope.n_axes == 3


class TestTraining:
    @param("pos_embed", ["rope_mixed", "alibi", "rope_axial+learned"])
    def test_grad_checkpointing_changes_nothing(self, pos_embed):
        model = tiny(pos_embed).train()
        x = images(40, 32)
        model(x).sum().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        out = model(x)
        model.zero_grad()
        model.set_grad_checkpointing(True)
        assert_close(model(x), out, atol=1e-6, rtol=1e-6)
        model(x).sum().backward()
        for name, p in model.named_parameters():
            assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)

    @param("pos_embed", ["rope_axial", "rope_mixed", "alibi"])
    def test_patch_dropout_equals_masking_the_dropped_keys(self, pos_embed):
        """Kept tokens keep their own positions: dropping patches gives the kept tokens exactly what
        attending only to them (a key mask) gives in the full sequence."""
        model = tiny(pos_embed, reg_tokens=1, patch_drop_rate=0.5).double().train()
        kept = {}
        model.patch_drop.register_forward_hook(lambda module, args, out: kept.update(index=out[1]))
        x = images(32, 32, dtype=torch.float64)
        torch.manual_seed(0)
        dropped = model.forward_features(x)  # B, 2 + 32, C
        torch.manual_seed(0)  # same kept patches, with a broadcast key mask that hides nothing
        unmasked = model.forward_features(x, attn_mask=torch.ones(2, 1, 1, 2 + 64, dtype=torch.bool))
        assert_close(unmasked, dropped, atol=1e-12, rtol=1e-12)
        k, index = 2, kept["index"]
        allowed = torch.zeros(2, 1, 1, k + 64, dtype=torch.bool)
        allowed[..., :k] = True
        allowed[torch.arange(2)[:, None], 0, 0, index + k] = True
        full = model.eval().forward_features(x, attn_mask=allowed)
        expected = torch.cat((full[:, :k], full[:, k:].gather(1, index[..., None].expand(-1, -1, 48))), dim=1)
        assert_close(dropped, expected, atol=1e-10, rtol=1e-10)

    @param("pos_embed", ["rope_mixed", "alibi", "learned"])
    def test_attn_mask_hides_patches(self, pos_embed):
        """Left-half tokens that may only attend to the left half never see what is in the right half."""
        model = tiny(pos_embed, depth=1, class_token=False, global_pool="avg")
        left = torch.zeros(8, 8, dtype=torch.bool)
        left[:, :4] = True
        left = left.flatten()
        mask = left[None, :].expand(64, -1)  # every query sees the left half only
        x, changed = images(32, 32, seed=1), images(32, 32, seed=2)
        changed[..., :, :16] = x[..., :, :16]  # same left half, different right half
        for attn_mask in (mask, torch.zeros(64, 64).masked_fill(~mask, float("-inf"))):
            assert_close(
                model.forward_features(changed, attn_mask=attn_mask)[:, left],
                model.forward_features(x, attn_mask=attn_mask)[:, left],
                atol=1e-6,
                rtol=1e-6,
            )
        assert (model.forward_features(changed)[:, left] - model.forward_features(x)[:, left]).abs().max() > 1e-3

    @param("pos_embed", POS_EMBED_CHOICES)
    def test_bf16_autocast(self, pos_embed):
        model = tiny(pos_embed)
        x = images(48, 48)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        assert_close(out.float(), model(x), atol=0.1, rtol=0.1)

    def test_bf16_weights(self):
        model = tiny("rope_mixed+learned").to(torch.bfloat16)
        out = model(images(48, 48, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


class TestIntermediates:
    @param("pos_embed", ["rope_mixed", "learned"])
    def test_forward_intermediates(self, pos_embed):
        model = tiny(pos_embed, reg_tokens=2)
        x = images(40, 24)
        final, maps = model.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True)
        assert_close(final, model.forward_features(x), atol=1e-6, rtol=1e-6)
        (grid, prefix), _ = maps
        assert grid.shape == (2, 48, 10, 6) and prefix.shape == (2, 3, 48)
        tokens = model.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True, intermediates_only=True)
        assert_close(tokens[0], final[:, 3:], atol=1e-6, rtol=1e-6)

    def test_features_only(self):
        model = timm.create_model("ndrope_vit_tiny_patch4_32", features_only=True, out_indices=(1,), **TINY)
        (features,) = model(images(48, 32))
        assert features.shape == (2, 48, 12, 8)

    def test_video_intermediates_are_channels_first(self):
        model = tiny("rope_axial", ndim=3, img_size=(4, 16, 16), patch_size=(2, 4, 4))
        (maps,) = model.forward_intermediates(images(4, 16, 16), indices=1, intermediates_only=True)
        assert maps.shape == (2, 48, 2, 4, 4)


class TestTimmKeywords:
    """Every timm keyword that is true of the model passes through to timm; only what is not true is refused."""

    def test_dynamic_img_size_true_is_what_the_model_does(self):
        model = tiny("rope_axial", dynamic_img_size=True)
        assert model.dynamic_img_size and model(images(48, 40)).shape == (2, 5)

    @param("global_pool", ["prr", "map", "avgmax"])
    def test_every_timm_global_pool(self, global_pool):
        model = tiny("rope_mixed", global_pool=global_pool)
        assert model.global_pool == global_pool and model(images(40, 32)).shape == (2, 5)

    def test_other_timm_keywords_reach_timm(self):
        model = tiny("learned", fix_init=True, pool_include_prefix=True, global_pool="avg", scale_attn_norm=True)
        assert model.pool_include_prefix and not isinstance(model.blocks[0].attn.norm, nn.Identity)
        reference = timm.create_model("vit_tiny_patch16_224", **TINY, fix_init=True, pool_include_prefix=True, global_pool="avg", scale_attn_norm=True)
        model.load_state_dict(reference.eval().state_dict())  # strict: same parameters as timm's
        assert_close(model(images(32, 32)), reference(images(32, 32)), atol=1e-6, rtol=1e-6)


class TestErrors:
    def test_unknown_pos_embed(self):
        with pytest.raises(ValueError, match=r"pos_embed='rope_2d'.*'rope_axial'"):
            NDRopeVisionTransformer("rope_2d", **TINY)

    def test_size_not_a_multiple_of_the_patch(self):
        with pytest.raises(ValueError, match=r"\(33, 32\).*patch_size=\(4, 4\).*\(32, 32\)"):
            tiny("rope_axial")(images(33, 32))

    def test_padding_accepts_any_size(self):
        model = tiny("rope_axial", dynamic_img_pad=True)
        assert model(images(33, 30)).shape == (2, 5)

    def test_wrong_channel_count(self):
        with pytest.raises(ValueError, match="x has 1 channels.*in_chans=3"):
            tiny("learned")(images(32, 32, channels=1))

    def test_wrong_rank(self):
        with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 32, 32\).*ndim=2"):
            tiny("learned")(images(4, 32, 32))

    def test_unknown_resolution_mode(self):
        with pytest.raises(ValueError, match="mode='stretch'.*'interpolate'"):
            tiny("rope_axial").set_resolution_mode("stretch")
        with pytest.raises(ValueError, match="rope_resolution_mode='stretch'"):
            tiny("rope_axial", rope_resolution_mode="stretch")

    def test_construction_errors(self):
        with pytest.raises(ValueError, match=r"img_size=\(30, 30\).*patch_size=\(4, 4\)"):
            NDRopeVisionTransformer("learned", **{**TINY, "img_size": 30})
        with pytest.raises(ValueError, match=r"img_size=\(8, 32\) must have ndim=3"):
            NDRopeVisionTransformer("learned", **{**TINY, "ndim": 3, "img_size": (8, 32)})
        with pytest.raises(ValueError, match="head_dim = embed_dim // num_heads = 11 must be even"):
            NDRopeVisionTransformer("rope_axial", **{**TINY, "embed_dim": 33})
        with pytest.raises(ValueError, match="embed_dim=50 must be divisible by num_heads=3"):
            NDRopeVisionTransformer("none", **{**TINY, "embed_dim": 50})
        with pytest.raises(ValueError, match="dynamic_img_size=False: .*only dynamic_img_size=True"):
            NDRopeVisionTransformer("learned", dynamic_img_size=False, **TINY)
        with pytest.raises(ValueError, match=r"global_pool='maxx' is not supported; choose one of \['', 'avg'"):
            NDRopeVisionTransformer("learned", **{**TINY, "global_pool": "maxx"})
        with pytest.raises(ValueError, match=r"weight_init='xavier'"):
            NDRopeVisionTransformer("learned", weight_init="xavier", **TINY)
        for name, value in (("rope_shift", -1.0), ("rope_jitter", 0.5), ("rope_rescale", float("nan"))):
            with pytest.raises(ValueError, match=rf"{name.split('_')[1]}=.*must be a finite number >="):
                NDRopeVisionTransformer("rope_axial", **{name: value}, **TINY)
        with pytest.raises(ValueError, match="attn_layer=.*RopeAttention"):
            NDRopeVisionTransformer("learned", attn_layer=timm.layers.Attention, **TINY)
        with pytest.raises(ValueError, match="ndim=0"):
            NDRopeVisionTransformer("learned", ndim=0, **TINY)
        with pytest.raises(ValueError, match="integer_norm='mean'"):
            NDRopeVisionTransformer("integer", integer_norm="mean", **TINY)

    @param("pos_embed", ["rope_axial", "learned"])
    def test_empty_batch_or_axis(self, pos_embed):
        model = tiny(pos_embed)
        with pytest.raises(ValueError, match=r"x has shape \(0, 3, 32, 32\).*batch of 0"):
            model(images(32, 32, batch=0))
        with pytest.raises(ValueError, match=r"x has shape \(2, 3, 0, 32\).*empty axis"):
            model(images(0, 32))
        with pytest.raises(ValueError, match=r"x has shape \(0, 3, 32, 32\)"):
            model.forward_intermediates(images(32, 32, batch=0))

    @param("shape", [(2, 65, 64), (5, 1, 65, 65), (2, 3, 65, 64), (1, 1, 1, 65, 65), (64, 64)])
    def test_attn_mask_of_the_wrong_shape(self, shape):
        with pytest.raises(ValueError, match=rf"attn_mask has shape \({', '.join(map(str, shape))},?\).*\(2, 3, 65, 65\)"):
            tiny("rope_axial")(images(32, 32), attn_mask=torch.ones(shape, dtype=torch.bool))

    def test_attn_mask_of_the_wrong_type(self):
        with pytest.raises(TypeError, match="attn_mask has dtype torch.int64"):
            tiny("rope_axial")(images(32, 32), attn_mask=torch.ones(65, 65, dtype=torch.long))
        with pytest.raises(TypeError, match="attn_mask must be a Tensor"):
            tiny("rope_axial")(images(32, 32), attn_mask=[[True]])

    @param("dtype", [torch.uint8, torch.bfloat16, torch.float16, torch.float64], ids=str)
    def test_input_dtype_other_than_the_model(self, dtype):
        x = images(32, 32).abs().mul(50).to(dtype)
        with pytest.raises(TypeError, match=rf"x has dtype {dtype}"):
            tiny("rope_mixed")(x)

    @param("mask_dtype", [torch.float32, torch.bool], ids=str)
    def test_attn_mask_on_another_device(self, mask_dtype):
        """A float mask on meta was silently ignored (a CPU result came back); a bool one crashed deep in torch."""
        with pytest.raises(ValueError, match=r"attn_mask .*meta"):
            tiny("rope_axial")(images(32, 32), attn_mask=torch.zeros(65, 65, dtype=mask_dtype, device="meta"))

    @param(
        "name, value",
        [
            ("reg_tokens", -1),
            ("patch_drop_rate", 1.5),
            ("drop_path_rate", 2.0),
            ("rope_theta", 0.0),
            ("rope_shift", -1.0),
            ("rope_jitter", 0.5),
            ("rope_rescale", float("inf")),
        ],
    )
    def test_bad_numbers_name_the_vit_argument(self, name, value):
        with pytest.raises(ValueError, match=rf"\b{name}={value!r}"):
            NDRopeVisionTransformer("rope_axial", **{**TINY, name: value})

    def test_unknown_global_pool(self):
        with pytest.raises(ValueError, match=r"global_pool='maxx' is not supported"):
            NDRopeVisionTransformer("rope_axial", **{**TINY, "global_pool": "maxx"})

    @param("name", ["drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate"])
    def test_torch_names_a_bad_dropout_rate(self, name):
        """timm's dropout rates reach torch's Dropout, whose ValueError gives the value and the range."""
        with pytest.raises(ValueError, match=r"dropout probability has to be between 0 and 1, but got 2.0"):
            NDRopeVisionTransformer("rope_axial", **{**TINY, name: 2.0})

    def test_bad_output_format(self):
        with pytest.raises(ValueError, match="output_fmt='NHWC'"):
            tiny("none").forward_intermediates(images(32, 32), output_fmt="NHWC")


@param("pos_embed", ["rope_axial", "rope_mixed"])
def test_compile_fullgraph_equals_eager(pos_embed):
    """The rotation is one op and the reference table a buffer: no graph break, eager's values and
    gradients (aot_eager keeps it fast; the inductor run is in the slow TestCompile)."""
    torch._dynamo.reset()
    model = tiny(pos_embed)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = images(32, 32)  # the training grid: its stored table
    assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-6)
    model.train()
    compiled(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


@param("attn_logit_scale", vit.ATTN_LOGIT_SCALE_CHOICES)
@param("pos_embed", [name for name in POS_EMBED_CHOICES if "rope" in name])
def test_compile_with_dynamic_shapes_serves_every_resolution(pos_embed, attn_logit_scale):
    """torch.compile(fullgraph=True, dynamic=True) of every RoPE pos_embed, evaluated: no graph break, eager's
    outputs at three grids, and at most one recompilation after the first graph (the grid stays symbolic; a
    square first input makes torch assume h == w once; the log-length scale is symbolic in the length too). A
    learned table resamples symbolically too when it needs no gradient."""
    torch._dynamo.reset()
    graphs = []

    def count_graphs(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    model = tiny(pos_embed, depth=1, attn_logit_scale=attn_logit_scale)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=count_graphs)
    with torch.no_grad():
        for size in ((32, 32), (48, 40), (64, 56)):
            x = images(*size)
            assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5, msg=f"{pos_embed} at {size}")
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 3 resolutions"


@pytest.mark.slow
class TestCompile:
    @param("pos_embed", POS_EMBED_CHOICES)
    def test_no_graph_breaks(self, pos_embed):
        """fullgraph=True fails on any graph break; forward and backward at two sizes."""
        torch._dynamo.reset()
        model = tiny(pos_embed, patch_drop_rate=0.25).train()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        for size in ((32, 32), (48, 48)):
            compiled(images(*size)).sum().backward()

    @param("pos_embed", ROPE_CHOICES)
    def test_inductor_matches_eager(self, pos_embed):
        torch._dynamo.reset()
        model = tiny(pos_embed)
        compiled = torch.compile(model, fullgraph=True)
        x = images(48, 48)
        assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


def materialise(module: nn.Module) -> None:
    """What Lightning's FSDP2 strategy does after building under torch.device("meta"): ``to_empty``, then
    ``reset_parameters()`` of every module that owns parameters or buffers (none may lack it)."""
    module.to_empty(device="cpu")
    for sub in module.modules():
        if any(True for _ in (*sub.parameters(recurse=False), *sub.buffers(recurse=False))):
            assert callable(getattr(sub, "reset_parameters", None)), f"{type(sub).__name__} has no reset_parameters"
            sub.reset_parameters()


class TestMetaDeviceInit:
    @param("pos_embed", POS_EMBED_CHOICES)
    def test_materialised_model_with_the_same_weights_equals_the_eager_one(self, pos_embed):
        """A rope_axial ViT used to differ by 4.6e-4 (its RoPE table was uninitialised memory)."""
        config = dict(TINY, reg_tokens=1, init_values=1e-5)
        eager = tiny(pos_embed, **config)
        for _ in range(2):  # two materialisations give identical results: nothing read from garbage
            with torch.device("meta"):
                model = NDRopeVisionTransformer(pos_embed, **config)
            materialise(model)
            model.load_state_dict(eager.state_dict())
            model.eval()
            for size in (32, 40):
                assert_close(model(images(size, size)), eager(images(size, size)), atol=0, rtol=0)

    def test_the_check_can_fail_without_reset(self):
        with torch.device("meta"):
            model = NDRopeVisionTransformer("alibi", **TINY)
        model.to_empty(device="cpu")
        model.alibi.slopes.fill_(float("nan"))  # what uninitialised memory may hold
        model.load_state_dict(tiny("alibi").state_dict())
        assert torch.isnan(model.eval()(images(32, 32))).all()
