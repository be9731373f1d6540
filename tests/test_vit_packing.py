"""vit.packing: images of several sizes in one packed batch equal the per-image forwards, for every pos_embed;
images never see each other; the packing plan, the mask and bad input."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vit
from vit import POS_EMBED_CHOICES, NDRopeVisionTransformer, PackedLayout, plan_packing

param = pytest.mark.parametrize
# img_size 28 with 4 px patches: a 7 x 7 training grid
TINY = dict(img_size=28, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5)
SIZES = (28, 36, 20)  # img_a, img_b, img_c: 49, 81 and 25 patches


def tiny(pos_embed: str, **overrides) -> NDRopeVisionTransformer:
    torch.manual_seed(0)
    return NDRopeVisionTransformer(pos_embed, **{**TINY, **overrides}).double().eval()


def image_list(sizes=SIZES, seed: int = 1, channels: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(channels, *((s, s) if isinstance(s, int) else s), generator=generator, dtype=torch.float64)
        for s in sizes
    ]


def per_image(model: NDRopeVisionTransformer, images: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(image[None]) for image in images])


def one_row(images: list[torch.Tensor], model: NDRopeVisionTransformer) -> int:
    """max_tokens that puts every image in one row."""
    return sum(model.num_prefix_tokens + image.shape[-1] * image.shape[-2] // 16 for image in images)


class TestPackedEqualsPerImage:
    @param("pos_embed", POS_EMBED_CHOICES)
    def test_logits(self, pos_embed):
        """Every pos_embed packs: logits of [28px, 36px, 20px] packed (one row, and rows of the longest
        image) equal the three forwards, float64."""
        model = tiny(pos_embed)
        images = image_list()
        expected = per_image(model, images)
        for max_tokens in (None, one_row(images, model)):
            assert_close(model.forward_packed(images, max_tokens=max_tokens), expected, atol=1e-12, rtol=1e-12)

    @param("pos_embed", ["rope_axial", "rope_mixed+learned", "alibi", "integer"])
    def test_gradients(self, pos_embed):
        """Training mode (no dropout configured): every parameter's gradient equals the per-image one."""
        model = tiny(pos_embed).train()
        images = image_list()
        weights = torch.randn(
            len(images), TINY["num_classes"], generator=torch.Generator().manual_seed(3), dtype=torch.float64
        )
        (per_image(model, images) * weights).sum().backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        (model.forward_packed(images, max_tokens=one_row(images, model)) * weights).sum().backward()
        for name, p in model.named_parameters():
            assert_close(p.grad, expected[name], atol=1e-12, rtol=1e-10, msg=name)

    @param("mode", ["extrapolate", "interpolate", "ntk"])
    @param("pos_embed", ["rope_axial", "rope_mixed"])
    def test_every_resolution_mode_positions_each_image_by_its_own_grid(self, pos_embed, mode):
        model = tiny(pos_embed, rope_resolution_mode=mode)
        images = image_list()
        assert_close(model.forward_packed(images), per_image(model, images), atol=1e-12, rtol=1e-12)

    @param("pos_embed", ["rope_axial", "alibi", "none"])
    def test_log_length_scale_is_per_image(self, pos_embed):
        model = tiny(pos_embed, attn_logit_scale="log-length")
        images = image_list()
        packed = model.forward_packed(images, max_tokens=one_row(images, model))
        assert_close(packed, per_image(model, images), atol=1e-12, rtol=1e-12)

    @param("options", [dict(reg_tokens=2), dict(class_token=False, global_pool="avg"), dict(global_pool="map"),
                       dict(rope_recipe="dinov3"), dict(no_embed_class=True, pos_embed="rope_axial+learned"),
                       dict(dynamic_img_pad=True)], ids=str)  # fmt: skip
    def test_prefix_tokens_pooling_and_recipes(self, options):
        options = {"pos_embed": "rope_axial", **options}
        model = tiny(options.pop("pos_embed"), **options)
        images = image_list((28, (36, 20), 21 if options.get("dynamic_img_pad") else 20, 28))
        assert_close(model.forward_packed(images), per_image(model, images), atol=1e-12, rtol=1e-12)

    def test_features_are_each_images_tokens(self):
        model = tiny("rope_mixed", reg_tokens=1)
        images = image_list()
        features = model.forward_features_packed(images)
        assert [f.shape for f in features] == [(2 + 49, 24), (2 + 81, 24), (2 + 25, 24)]
        for image, tokens in zip(images, features):
            assert_close(tokens, model.forward_features(image[None])[0], atol=1e-12, rtol=1e-12)

    @param("pos_embed", ["rope_axial", "learned"])
    def test_video(self, pos_embed):
        torch.manual_seed(0)
        model = NDRopeVisionTransformer(pos_embed, ndim=3, img_size=(4, 16, 16), patch_size=(2, 4, 4), embed_dim=24,
                                        depth=1, num_heads=2, num_classes=3).double().eval()  # fmt: skip
        videos = image_list(((4, 16, 16), (6, 12, 20), (2, 8, 8)))
        assert_close(model.forward_packed(videos), per_image(model, videos), atol=1e-12, rtol=1e-12)


@param("pos_embed", ["rope_mixed", "alibi", "learned"])
def test_bf16_autocast(pos_embed) -> None:
    model = tiny(pos_embed, attn_logit_scale="log-length").float()
    images = [image.float() for image in image_list()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_packed(images)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), model.forward_packed(images), atol=0.1, rtol=0.1)


class TestIsolation:
    @param("pos_embed", ["rope_mixed", "alibi", "learned", "none"])
    def test_changing_one_image_moves_only_its_outputs(self, pos_embed):
        """Image b perturbed: a's and c's tokens (in the same row) do not move at all; b's do."""
        model = tiny(pos_embed)
        images = image_list()
        changed = [images[0], images[1] + torch.randn_like(images[1]), images[2]]
        max_tokens = one_row(images, model)
        assert plan_packing([50, 82, 26], max_tokens).num_rows == 1
        before = model.forward_features_packed(images, max_tokens=max_tokens)
        after = model.forward_features_packed(changed, max_tokens=max_tokens)
        assert_close(after[0], before[0], atol=0, rtol=0)
        assert_close(after[2], before[2], atol=0, rtol=0)
        assert (after[1] - before[1]).abs().max() > 1e-3

    def test_no_gradient_crosses_images(self):
        model = tiny("rope_axial")
        images = [image.requires_grad_() for image in image_list()]
        model.forward_packed(images, max_tokens=one_row(images, model))[0].sum().backward()
        assert images[0].grad.abs().max() > 0
        assert images[1].grad is None or images[1].grad.abs().max() == 0
        assert images[2].grad is None or images[2].grad.abs().max() == 0

    def test_mask_is_block_diagonal(self):
        """Against a loop over every token pair: same image (or both padding) may attend, nothing else."""
        layout = plan_packing([3, 5, 2, 4], max_tokens=8)
        ids = layout.segment_ids()
        mask = layout.attention_mask()
        assert mask.shape == (layout.num_rows, 1, layout.seq_len, layout.seq_len)
        for row in range(layout.num_rows):
            for i in range(layout.seq_len):
                for j in range(layout.seq_len):
                    assert bool(mask[row, 0, i, j]) == (int(ids[row, i]) == int(ids[row, j])), (row, i, j)
        assert mask.any(-1).all()  # every query keeps a key: no empty softmax row


class TestPatchDropout:
    @param("pos_embed", ["rope_mixed", "alibi"])
    def test_each_image_keeps_its_own_positions(self, pos_embed):
        """Each image drops its own patches, and its kept tokens get what attending only to them gives in
        its full sequence (its own RoPE rows, its ALiBi rows and columns)."""
        model = tiny(pos_embed, patch_drop_rate=0.5).train()
        kept = []
        model.patch_drop.register_forward_hook(lambda module, args, out: kept.append(out[1]))
        images = image_list((28, 36, 28))
        features = model.forward_features_packed(images)
        assert [f.shape[0] for f in features] == [1 + 24, 1 + 40, 1 + 24]  # timm keeps int((1 - 0.5) * N) patches
        index = {0: kept[0][0], 2: kept[0][1], 1: kept[1][0]}  # images of one size are embedded together, in order
        model.eval()
        for i, image in enumerate(images):
            n = features[i].shape[0] - 1
            patches = image.shape[-1] * image.shape[-2] // 16
            allowed = torch.zeros(1, 1, 1, 1 + patches, dtype=torch.bool)
            allowed[..., 0] = True
            allowed[..., index[i] + 1] = True
            full = model.forward_features(image[None], attn_mask=allowed)[0]
            expected = torch.cat((full[:1], full[1:][index[i]]))
            assert expected.shape[0] == 1 + n
            assert_close(features[i], expected, atol=1e-10, rtol=1e-10)


class TestPlan:
    def test_first_fit_longest_first(self):
        layout = plan_packing([3, 5, 2, 4], max_tokens=8)
        # 5 -> row 0; 4 -> row 1; 3 -> row 0 (5 + 3 = 8); 2 -> row 1
        assert layout == PackedLayout(
            lengths=(3, 5, 2, 4), rows=(0, 0, 1, 1), starts=(5, 0, 4, 0), num_rows=2, seq_len=8
        )

    def test_default_rows_hold_the_longest_image(self):
        layout = plan_packing([50, 82, 26, 26])  # 82 alone; 50 + 26; the last 26 in a third row (102 > 82)
        assert layout == PackedLayout(
            lengths=(50, 82, 26, 26), rows=(1, 0, 1, 2), starts=(0, 0, 50, 0), num_rows=3, seq_len=82
        )

    def test_segments_never_overlap_and_fit(self):
        lengths = [int(n) for n in torch.randint(1, 30, (40,), generator=torch.Generator().manual_seed(0))]
        layout = plan_packing(lengths, max_tokens=45)
        ids = layout.segment_ids()
        for image, n in enumerate(lengths):
            assert int((ids == image).sum()) == n
            assert (ids[layout.rows[image], layout.starts[image] : layout.starts[image] + n] == image).all()
        assert layout.seq_len <= 45

    def test_pack_and_unpack_round_trip(self):
        layout = plan_packing([3, 5, 2], max_tokens=6)
        segments = [torch.full((n, 2), float(i + 1)) for i, n in enumerate(layout.lengths)]
        packed = layout.pack(segments)
        assert packed.shape == (layout.num_rows, layout.seq_len, 2)
        assert int((packed == 0).all(-1).sum()) == layout.num_rows * layout.seq_len - 10  # zeros only in the padding
        for original, back in zip(segments, layout.unpack(packed)):
            assert_close(back, original, atol=0, rtol=0)


class TestErrors:
    def test_a_tensor_instead_of_a_list(self):
        with pytest.raises(
            TypeError,
            match=r"images must be a list of \(C, \*spatial\) tensors, got a tensor of shape \(2, 3, 28, 28\)",
        ):
            tiny("rope_axial").forward_packed(torch.randn(2, 3, 28, 28, dtype=torch.float64))

    def test_an_empty_list(self):
        with pytest.raises(ValueError, match=r"images=\[\] is empty"):
            tiny("rope_axial").forward_packed([])

    def test_not_a_list(self):
        with pytest.raises(TypeError, match=r"images must be a list of \(C, \*spatial\) tensors, got generator"):
            tiny("rope_axial").forward_packed(image for image in image_list())

    def test_segments_that_do_not_match_the_layout(self):
        layout = plan_packing([3, 5])
        with pytest.raises(
            ValueError, match=r"leading sizes \[\(3,\), \(4,\)\] do not match the layout's lengths=\(3, 5\)"
        ):
            layout.pack([torch.zeros(3, 2), torch.zeros(4, 2)])

    def test_a_bad_image_is_named_by_its_index(self):
        model = tiny("rope_axial")
        good = image_list((28,))[0]
        with pytest.raises(ValueError, match=r"images\[1\] has 1 channels.*in_chans=3"):
            model.forward_packed([good, image_list((28,), channels=1)[0]])
        with pytest.raises(
            ValueError, match=r"images\[2\] has spatial size \(30, 28\), not a multiple of patch_size=\(4, 4\)"
        ):
            model.forward_packed([good, good, torch.randn(3, 30, 28, dtype=torch.float64)])
        with pytest.raises(
            ValueError, match=r"images\[0\] has shape \(1, 3, 28, 28\) \(rank 4\).*expected rank 3, \(C, \*spatial\)"
        ):
            model.forward_packed([good[None]])
        with pytest.raises(
            TypeError, match=r"images\[1\] has dtype torch.float32 but the model's weights are torch.float64"
        ):
            model.forward_packed([good, good.float()])
        with pytest.raises(TypeError, match=r"images\[0\] must be a torch.Tensor"):
            model.forward_packed([[1.0]])

    def test_max_tokens_too_small_for_an_image(self):
        with pytest.raises(
            ValueError, match=r"max_tokens=60 cannot hold image 1, which has 82 tokens.*max_tokens >= 82"
        ):
            tiny("rope_axial").forward_packed(image_list(), max_tokens=60)
        with pytest.raises(ValueError, match=r"max_tokens=0 must be an int >= 1"):
            plan_packing([3], max_tokens=0)
        with pytest.raises(ValueError, match=r"lengths=\[\] must be a non-empty sequence"):
            plan_packing([])


def test_exported() -> None:
    assert vit.plan_packing is plan_packing and vit.PackedLayout is PackedLayout
