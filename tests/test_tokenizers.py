"""Tokenizers: the GEMM stem equals the convolution stem it replaced; the authors' MLP tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s2v_core.architecture import ModelConfig
from s2v_core.legacy import LegacyConvTokenizer, convert_tokenizer_state, strided_weight_from_conv
from s2v_core.tokenizers import ConvTokenizer, MLPTokenizer, StridedConv, build_tokenizer, stem_steps


@pytest.mark.parametrize("samples", [3840, 480, 120])
def test_gemm_stem_equals_the_conv1d_stem_with_the_same_weights(samples):
    torch.manual_seed(0)
    old = LegacyConvTokenizer(samples, 24, 6)
    new = ConvTokenizer(samples, 24, 6)
    new.load_state_dict(convert_tokenizer_state(old.state_dict()))
    x = torch.randn(3, 4, samples, requires_grad=True)
    expected, got = old(x), new(x)
    assert got.shape == (3, 4, 24)
    assert torch.allclose(got, expected, atol=1e-5)
    # The input gradient too: the GEMM form is the same function, not an approximation.
    (grad_old,), (grad_new,) = (torch.autograd.grad(y.square().sum(), x) for y in (expected, got))
    assert torch.allclose(grad_new, grad_old, atol=1e-5)


@pytest.mark.parametrize("steps", [480, 60, 61, 33])
def test_strided_layer_is_a_padded_stride_4_convolution(steps):
    torch.manual_seed(1)
    layer = StridedConv(5)
    weight = torch.randn(5, 5, 8)
    with torch.no_grad():
        layer.blocks.weight.copy_(strided_weight_from_conv(weight))
    x = torch.randn(2, steps, 5)
    expected = F.conv1d(x.transpose(1, 2), weight, layer.bias, stride=4, padding=2).transpose(1, 2)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_stem_lengths_follow_the_sampling_rate():
    assert stem_steps(3840) == [480, 120, 30] and stem_steps(480) == [60, 15] and stem_steps(120) == [15]
    with pytest.raises(ValueError, match="multiple of the patch length"):
        stem_steps(100)


def test_mlp_tokenizer_is_a_residual_two_layer_mlp_then_layernorm():
    torch.manual_seed(2)
    tokenizer = MLPTokenizer(120, 16, dropout=0.0).eval()
    x = torch.randn(2, 3, 120)
    branch = tokenizer.output(F.silu(tokenizer.hidden(x)))
    expected = F.layer_norm(branch + tokenizer.residual(x), (16,), tokenizer.norm.weight, tokenizer.norm.bias)
    assert torch.allclose(tokenizer(x), expected, atol=1e-6)
    assert tokenizer.hidden.out_features == 32  # 2d


def test_build_tokenizer_follows_the_config_and_rejects_unknown_kinds():
    assert isinstance(build_tokenizer("mlp", 480, ModelConfig(tokenizer="mlp")), MLPTokenizer)
    assert isinstance(build_tokenizer("conv", 480, ModelConfig()), ConvTokenizer)
    with pytest.raises(ValueError, match="conv, mlp"):
        build_tokenizer("cnn", 480, ModelConfig())
