"""DPO losses: hand-computed values, TRL's formulas on random inputs, and log-prob masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modern_llm.alignment.dpo_loss import dpo_loss, next_token_targets, sequence_logprobs, token_logprobs


def _toy():
    # chosen log-ratio +1, rejected log-ratio -1
    return (
        torch.tensor([-1.0, -5.0]),
        torch.tensor([-3.0, -5.0]),
        torch.tensor([-2.0, -5.0]),
        torch.tensor([-2.0, -5.0]),
    )


def test_sigmoid_dpo_matches_hand_computed_values():
    out = dpo_loss(*_toy(), beta=0.5)
    # pair 0: h = 0.5 * (1 - (-1)) = 1 -> -log sigmoid(1) = log(1 + e^-1); pair 1: h = 0 -> log 2
    assert out.losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log(2.0)], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.0])
    assert out.margins.tolist() == pytest.approx([1.0, 0.0])
    assert float(out.accuracy) == 0.5  # the tie does not count as a win


def test_cdpo_label_smoothing_matches_hand_computed_value():
    out = dpo_loss(*_toy(), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert float(out.losses[0]) == pytest.approx(expected, abs=1e-6)
    assert float(out.losses[1]) == pytest.approx(math.log(2.0), abs=1e-6)  # smoothing is symmetric at h = 0


def test_dpo_positive_penalises_only_chosen_below_reference():
    # pair 0: chosen log-ratio -2 (fell below the reference), rejected -3; pair 1: chosen +1, rejected -1
    policy_c, policy_r = torch.tensor([-4.0, -1.0]), torch.tensor([-6.0, -3.0])
    ref_c, ref_r = torch.tensor([-2.0, -2.0]), torch.tensor([-3.0, -2.0])
    out = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5, dpop_lambda=2.0)
    # pair 0: h = 0.5 * (-2 - (-3) - 2 * 2) = -1.5; pair 1: no penalty, h = 0.5 * (1 + 1) = 1
    expected = [math.log1p(math.exp(1.5)), math.log1p(math.exp(-1.0))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    plain = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    assert float(plain.losses[1]) == pytest.approx(
        float(out.losses[1])
    )  # lambda is inert above the reference
    assert out.chosen_rewards.tolist() == pytest.approx(plain.chosen_rewards.tolist())  # rewards unchanged
    with pytest.raises(ValueError, match="dpop_lambda"):
        dpo_loss(policy_c, policy_r, ref_c, ref_r, loss_type="ipo", dpop_lambda=1.0)


def test_ipo_matches_hand_computed_value():
    out = dpo_loss(*_toy(), beta=0.5, loss_type="ipo")
    # d = 1 - (-1) = 2, 1/(2 beta) = 1 -> (2 - 1)^2 = 1; pair 1: (0 - 1)^2 = 1
    assert out.losses.tolist() == pytest.approx([1.0, 1.0])
    normed = dpo_loss(
        *_toy(),
        beta=0.5,
        loss_type="ipo",
        chosen_lengths=torch.tensor([2, 4]),
        rejected_lengths=torch.tensor([4, 4]),
    )
    # pair 0: 1/2 - (-1/4) = 0.75 -> (0.75 - 1)^2
    assert float(normed.losses[0]) == pytest.approx(0.0625)


# --- TRL reference. TRL 1.16 computes the loss inside DPOTrainer._compute_loss (a method that needs a full
# trainer and a model that returns `log_probs`), so it cannot be called on bare tensors. These functions copy
# its formulas from trl/trainer/dpo_trainer.py (v1.16), with f_divergence_type="reverse_kl" (standard DPO):
#   chosen_logratios = chosen_logps - ref_chosen_logps ; rejected_logratios likewise
#   delta_score = chosen_logratios - rejected_logratios
#   "sigmoid": per_sequence_loss = -F.logsigmoid(self.beta * delta_score)
#   label-smoothed form ("aot" branch; the cDPO form of earlier TRL sigmoid loss):
#       -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
#   "ipo": chosen_scores / completion_mask.sum(1).clamp(min=1) (same for rejected);
#          per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2
#   rewards logged as beta * logratios.


def _trl_sigmoid(pc, pr, rc, rr, beta, ls=0.0):
    delta = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls


def _trl_ipo(pc, pr, rc, rr, beta, len_c, len_r):
    delta = (pc - rc) / len_c.clamp(min=1.0) - (pr - rr) / len_r.clamp(min=1.0)
    return (delta - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_matches_trl_formulas_on_random_inputs(beta):
    gen = torch.Generator().manual_seed(int(beta * 100))
    pc, pr, rc, rr = (-torch.rand(64, generator=gen, dtype=torch.float64) * 50 for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(out.losses, _trl_sigmoid(pc, pr, rc, rr, beta))
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr))
    smoothed = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2)
    torch.testing.assert_close(smoothed.losses, _trl_sigmoid(pc, pr, rc, rr, beta, 0.2))
    len_c = torch.randint(1, 30, (64,), generator=gen).double()
    len_r = torch.randint(1, 30, (64,), generator=gen).double()
    ipo = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=len_c, rejected_lengths=len_r)
    torch.testing.assert_close(ipo.losses, _trl_ipo(pc, pr, rc, rr, beta, len_c, len_r))


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-4.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.1).losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # gradient descent raises log pi(chosen), lowers rejected
    assert pc.grad.item() == pytest.approx(-0.05)  # -beta * sigmoid(0)


def test_bad_arguments_raise():
    args = _toy()
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, loss_type="hinge")
    with pytest.raises(ValueError, match="same length"):
        dpo_loss(args[0], args[1][:1], args[2], args[3])
    with pytest.raises(ValueError, match="both"):
        dpo_loss(*args, loss_type="ipo", chosen_lengths=torch.ones(2))


# --- log-probs


def test_sequence_logprobs_sums_log_softmax_over_unmasked_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    expected = []
    for b in range(2):
        logp = logits[b].log_softmax(-1)
        expected.append(sum(float(logp[t, targets[b, t]]) for t in range(5) if targets[b, t] != -100))
    assert sequence_logprobs(logits, targets).tolist() == pytest.approx(expected, abs=1e-5)
    means = sequence_logprobs(logits, targets, average=True)
    assert means.tolist() == pytest.approx([expected[0] / 2, expected[1] / 4], abs=1e-5)


def test_sequence_logprobs_are_float64_accurate_at_a_real_vocabulary_size():
    """At V=49k (SmolLM2) a 128-token sum stays within fp32 rounding of the float64 value.

    Reducing over a strided class dim (cross_entropy on (B, V, T)) missed by ~0.06 nats here, always upwards.
    """
    torch.manual_seed(0)
    logits = torch.randn(2, 128, 49152)
    logits[..., :10] += 15.0  # a few dominant tokens and a long flat tail, like a trained LM's
    targets = torch.randint(0, 49152, (2, 128))
    exact = logits.double().log_softmax(-1).gather(-1, targets[..., None])[..., 0].sum(dim=1)
    assert (sequence_logprobs(logits, targets).double() - exact).abs().max() < 0.01


def test_masked_prompt_positions_contribute_nothing():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 9)
    targets = torch.tensor([[-100, -100, -100, 2, 5, -100]])
    base = sequence_logprobs(logits, targets)
    scrambled = logits.clone()
    scrambled[:, :3] = torch.randn(1, 3, 9) * 100  # prompt positions
    scrambled[:, 5] = torch.randn(9) * 100  # padding position
    assert torch.equal(sequence_logprobs(scrambled, targets), base)
    assert token_logprobs(scrambled, targets)[0, :3].abs().sum() == 0


def test_next_token_targets_matches_hf_internal_shift(tmp_path):
    """-mean of our log-probs over shifted labels == the loss a HF causal LM computes from the same labels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    ids = torch.randint(0, 50, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding
    out = model(input_ids=ids, labels=labels)
    targets = next_token_targets(labels)
    ours = -sequence_logprobs(out.logits, targets).sum() / (targets != -100).sum()
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="agree"):
        sequence_logprobs(out.logits, labels[:, :4])
