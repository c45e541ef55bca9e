"""ModernDecoderLM end to end: shapes, loss, tied weights, learning on a toy task, dropout, FLOPs."""

import math

import pytest
import torch

from modern_llm.config import ModernLLMConfig
from modern_llm.models import ModernDecoderLM


def cfg(**kw):
    return ModernLLMConfig(**(dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32) | kw))


def test_shapes_and_loss_ignores_minus_100():
    model = ModernDecoderLM(cfg())
    ids = torch.randint(0, 64, (3, 10))
    targets = ids.clone()
    targets[:, :4] = -100
    out = model(ids, targets=targets)
    assert out.logits.shape == (3, 10, 64) and out.logits.dtype == torch.float32
    ref = torch.nn.functional.cross_entropy(out.logits[:, 4:].reshape(-1, 64), ids[:, 4:].reshape(-1))
    assert out.ce_loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.aux_loss.item() == 0.0


def test_initial_loss_is_near_uniform():
    model = ModernDecoderLM(cfg(vocab_size=512, tie_embeddings=False))
    ids = torch.randint(0, 512, (4, 16))
    assert model(ids, targets=torch.roll(ids, 1, 1)).ce_loss.item() == pytest.approx(math.log(512), abs=0.15)


def test_tied_and_untied_embeddings():
    tied, untied = ModernDecoderLM(cfg()), ModernDecoderLM(cfg(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 64 * 32


@pytest.mark.parametrize(
    "kw", [{}, {"pos_encoding": "learned"}, {"n_sinks": 2, "qk_norm": True}, {"moe_layers": [1]}]
)
def test_learns_to_copy_previous_token(kw):
    torch.manual_seed(0)
    model = ModernDecoderLM(cfg(**kw))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (16, 16))
    targets = torch.cat([torch.full((16, 1), -100), ids[:, :-1]], 1)  # predict the previous token
    first = None
    for _ in range(60):
        loss = model(ids, targets=targets).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_dropout_only_in_train_mode():
    model = ModernDecoderLM(cfg(dropout=0.3))
    ids = torch.randint(0, 64, (2, 8))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_flops_per_token_follows_6n_plus_attention():
    model = ModernDecoderLM(cfg())
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16


def test_batch_positions_are_independent():
    model = ModernDecoderLM(cfg()).eval()
    a, b = torch.randint(0, 64, (1, 12)), torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        both = model(torch.cat([a, b])).logits
        assert torch.allclose(both[0], model(a).logits[0], atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"moe_layers": [0], "dropout": 0.1}])
def test_activation_checkpointing_gives_identical_loss_and_grads(kw):
    torch.manual_seed(0)
    plain = ModernDecoderLM(cfg(**kw))
    ckpt = ModernDecoderLM(cfg(activation_checkpointing=True, **kw))
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks in both runs
        loss = model(ids, targets=ids.roll(-1, 1)).loss
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)
