"""PatchEmbed2d is timm's PatchEmbed; PatchEmbedND: the Linear is the strided ConvNd, token order is row-major over the grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch.testing import assert_close

from vit import PatchEmbed2d, PatchEmbedND

param = pytest.mark.parametrize


def embed(img_size, patch_size, **kwargs) -> PatchEmbedND:
    torch.manual_seed(0)
    return PatchEmbedND(img_size, patch_size, in_chans=3, embed_dim=8, **kwargs).double()


def inputs(*size: int) -> torch.Tensor:
    return torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class TestPatchEmbedND:
    def test_2d_equals_timms_conv_patch_embed(self):
        ours = embed((8, 12), 4, strict_img_size=False)
        theirs = PatchEmbed((8, 12), 4, in_chans=3, embed_dim=8, output_fmt="NHWC", strict_img_size=False).double()
        theirs.proj.weight.data.copy_(ours.proj.weight.view(8, 3, 4, 4))
        theirs.proj.bias.data.copy_(ours.proj.bias)
        x = inputs(12, 16)
        assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-12)

    def test_3d_equals_a_strided_conv3d(self):
        module = embed((4, 8, 8), (2, 4, 4))
        x = inputs(4, 8, 8)
        conv = F.conv3d(x, module.proj.weight.view(8, 3, 2, 4, 4), module.proj.bias, stride=(2, 4, 4))
        assert_close(module(x), conv.permute(0, 2, 3, 4, 1), atol=1e-12, rtol=1e-12)

    def test_4d_tokens_project_their_own_patch(self):
        module = embed((2, 4, 4, 4), (1, 2, 2, 2))
        x = inputs(2, 4, 4, 4)
        out = module(x)
        assert out.shape == (2, 2, 2, 2, 2, 8)
        patch = x[:, :, 1:2, 2:4, 0:2, 2:4].reshape(2, -1)  # grid index (1, 1, 0, 1), flattened (c, p0..p3)
        assert_close(out[:, 1, 1, 0, 1], module.proj(patch), atol=1e-12, rtol=1e-12)

    def test_dynamic_padding_zero_pads_the_end_of_each_axis(self):
        module = embed((4, 8, 8), (2, 4, 4), dynamic_img_pad=True, strict_img_size=False)
        x = inputs(3, 7, 8)
        assert_close(module(x), module(F.pad(x, (0, 0, 0, 1, 0, 1))), atol=0, rtol=0)

    def test_strict_size(self):
        with pytest.raises(ValueError, match=r"\(4, 8, 12\) must equal img_size=\(4, 8, 8\)"):
            embed((4, 8, 8), (2, 4, 4))(inputs(4, 8, 12))
        assert embed((4, 8, 8), (2, 4, 4), strict_img_size=False)(inputs(4, 8, 12)).shape == (2, 2, 2, 3, 8)

    def test_errors_name_the_value(self):
        with pytest.raises(ValueError, match=r"patch_size=\(2, 4\)"):
            embed((4, 8, 8), (2, 4))
        with pytest.raises(ValueError, match="output_fmt='NCHW'"):
            embed((4, 8, 8), 2, output_fmt="NCHW")


class TestPatchEmbed2d:
    def timm_pair(self, **kwargs) -> tuple[PatchEmbed, PatchEmbed2d]:
        args = dict(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=8, output_fmt="NHWC", strict_img_size=False)
        theirs = PatchEmbed(**args, **kwargs).double()
        ours = PatchEmbed2d(**args, **kwargs).double()
        ours.load_state_dict(theirs.state_dict())  # strict: timm's parameters
        return theirs, ours

    @param("dynamic_img_pad, size", [(False, (12, 16)), (True, (11, 14))])
    def test_equals_timms_patch_embed(self, dynamic_img_pad, size):
        theirs, ours = self.timm_pair(dynamic_img_pad=dynamic_img_pad)
        assert isinstance(ours, PatchEmbed)
        assert_close(ours(inputs(*size)), theirs(inputs(*size)), atol=0, rtol=0)

    def test_compiles_once_for_every_size(self):
        """timm's own forward formats the size into its assert messages, so torch.compile specialises on it."""
        torch._dynamo.reset()
        graphs = []

        def count_graphs(graph: torch.fx.GraphModule, example_inputs: list) -> object:
            graphs.append(graph)
            return graph.forward

        theirs, ours = self.timm_pair()
        compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend=count_graphs)
        for size in ((8, 12), (12, 16), (20, 8)):
            assert_close(compiled(inputs(*size)), theirs(inputs(*size)), atol=0, rtol=0)
        assert len(graphs) == 1
