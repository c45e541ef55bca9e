"""MoE: routing, capacity dropping and aux losses against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from modern_llm.config import ModernLLMConfig
from modern_llm.models import ModernDecoderLM
from modern_llm.models.moe import MoEFeedForward


def moe(**kw):
    args = dict(d_model=8, d_ff=16, n_experts=4, top_k=2, capacity_factor=0.0) | kw
    return MoEFeedForward(**args)


def test_output_equals_weighted_sum_of_chosen_experts():
    layer = moe().eval()
    x = torch.randn(1, 5, 8)
    y, _ = layer(x)
    probs = F.softmax(layer.router(x[0]), -1)
    for t in range(5):
        w, idx = probs[t].topk(2)
        w = w / w.sum()
        ref = torch.zeros(8)
        for weight, e in zip(w, idx):
            gate, up = (layer.w_gate_up[e] @ x[0, t]).chunk(2)
            ref += weight * (layer.w_down[e] @ (F.silu(gate) * up))
        assert torch.allclose(y[0, t], ref, atol=1e-5)


def test_capacity_drops_overflow_and_serves_first_choices_first():
    layer = moe(top_k=1, n_experts=2, capacity_factor=1.0).train()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0] + [0.0] * 7, [-1.0] + [0.0] * 7]))
    x = torch.zeros(1, 4, 8)
    x[0, :, 0] = 1.0  # every token prefers expert 0
    # capacity = ceil(1.0 * 4 tokens * 1 / 2 experts) = 2 -> tokens 2 and 3 overflow expert 0
    top_i = layer.route(x[0])[2]
    keep = layer.keep_mask(top_i)
    assert keep.squeeze(1).tolist() == [True, True, False, False]
    y, aux = layer(x)
    assert torch.all(y[0, 2:] == 0) and torch.any(y[0, :2] != 0)
    assert aux["dropped_frac"].item() == pytest.approx(0.5)
    layer.eval()  # no capacity at eval: nothing dropped
    assert layer(x)[1]["dropped_frac"].item() == 0.0


def test_second_choices_drop_before_first_choices():
    layer = moe(top_k=2, n_experts=2, capacity_factor=0.5).train()  # capacity = ceil(.5*3*2/2) = 2
    top_i = torch.tensor([[0, 1], [1, 0], [0, 1]])
    keep = layer.keep_mask(top_i)
    # expert 0: arrivals token0 (1st), token2 (1st), token1 (2nd) -> token1's 2nd choice dropped
    # expert 1: arrivals token1 (1st), token0 (2nd), token2 (2nd) -> token2's 2nd choice dropped
    assert keep.tolist() == [[True, True], [True, False], [True, False]]


def test_aux_losses_match_hand_computation():
    layer = moe(top_k=1, n_experts=2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    top_i = logits.argmax(-1, keepdim=True)
    aux = layer.aux_losses(logits, top_i)
    p = F.softmax(logits, -1)
    f = torch.tensor([2 / 3, 1 / 3])
    assert aux["load_balance"].item() == pytest.approx(2 * (f * p.mean(0)).sum().item(), rel=1e-6)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 3
    assert aux["z_loss"].item() == pytest.approx(z, rel=1e-6)


def test_balanced_routing_gives_load_balance_one():
    layer = moe(top_k=1, n_experts=2)
    logits = torch.zeros(4, 2)
    top_i = torch.tensor([[0], [1], [0], [1]])
    assert layer.aux_losses(logits, top_i)["load_balance"].item() == pytest.approx(1.0)


def test_model_adds_weighted_aux_loss_and_reports_stats():
    cfg = ModernLLMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, moe_layers=[0, 1])
    model = ModernDecoderLM(cfg)
    ids = torch.randint(0, 40, (2, 8))
    out = model(ids, targets=ids)
    expected = (
        cfg.moe_aux_loss_coef * out.router_stats["load_balance"]
        + cfg.moe_z_loss_coef * out.router_stats["z_loss"]
    )
    assert torch.allclose(out.aux_loss, expected)
    assert torch.allclose(out.loss, out.ce_loss + out.aux_loss)
    out.loss.backward()
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0


def test_active_params_count_top_k_experts_only():
    cfg = ModernLLMConfig(
        vocab_size=40, d_model=16, n_layers=1, n_heads=2, moe_layers=[0], moe_n_experts=4, moe_top_k=1
    )
    model = ModernDecoderLM(cfg)
    ffn = model.blocks[0].ffn
    expert_params = ffn.w_gate_up.numel() + ffn.w_down.numel()
    assert model.num_params() - model.num_params(active=True) == expert_params * 3 // 4
