"""The backbone: named projections, the old nn.TransformerEncoder's function, rotary positions."""

from __future__ import annotations

import torch
from torch import nn

from s2v_core.backbone import Backbone, apply_rotary, rotary_tables
from s2v_core.legacy import convert_format1_state


def test_projections_are_named_linears_that_adapters_can_target():
    backbone = Backbone(16, 2, 4, 32, 0.0, rotary=True)
    names = {name.rsplit(".", 1)[-1] for name, module in backbone.named_modules() if isinstance(module, nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_equals_a_norm_first_transformer_encoder_with_converted_weights():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 4, dim_feedforward=32, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    old = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    final = nn.LayerNorm(16)
    nn.init.normal_(final.weight)
    state = {f"backbone.{k}": v for k, v in old.state_dict().items()}
    state.update({f"final_norm.{k}": v for k, v in final.state_dict().items()})
    new = Backbone(16, 2, 4, 32, 0.0, rotary=False).eval()
    new.load_state_dict({k[len("backbone.") :]: v for k, v in convert_format1_state(state).items()})
    x = torch.randn(3, 7, 16)
    assert torch.allclose(new(x), final(old(x)), atol=1e-5)


def test_rotary_scores_depend_only_on_the_offset_between_positions():
    torch.manual_seed(1)
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = rotary_tables(200, 8, torch.device("cpu"))

    def score(i, j):
        return apply_rotary(q, cos[i], sin[i]) @ apply_rotary(k, cos[j], sin[j])

    assert torch.allclose(score(3, 1), score(150, 148), atol=1e-4)
    assert torch.allclose(score(0, 0), q @ k, atol=1e-5)  # position 0 is the identity
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_rotary_backbone_encodes_any_length_and_is_shift_equivariant_in_attention():
    torch.manual_seed(2)
    backbone = Backbone(16, 2, 2, 32, 0.0, rotary=True).eval()
    long = backbone(torch.randn(2, 300, 16))
    assert long.shape == (2, 300, 16) and torch.isfinite(long).all()
    # Identical tokens at every position: rotary attention has nothing to tell them apart by.
    same = backbone(torch.randn(1, 1, 16).expand(1, 50, 16))
    assert torch.allclose(same, same[:, :1].expand_as(same), atol=1e-5)
