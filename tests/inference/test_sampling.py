"""Sampling: parameter validation, top-k/top-p/repetition penalty (hand-made cases + HF warpers), RNG."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from modern_llm.inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_generators,
    row_seed,
    sample_from_logits,
    select_next_tokens,
    top_k_filter,
    top_p_filter,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads
    # waiting at a barrier for a descheduled peer made small matmuls ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NEG_INF = float("-inf")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 3.0}, "max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_bad_params_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_defaults_are_greedy_and_valid_edges_accepted():
    assert SamplingParams().greedy
    p = SamplingParams(temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=1, seed=0)
    assert not p.greedy


def test_top_k_on_a_hand_made_distribution():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert top_k_filter(logits, 2).tolist() == [[NEG_INF, 5.0, NEG_INF, 4.0, NEG_INF]]
    assert top_k_filter(logits, 0).tolist() == logits.tolist()  # 0 = off
    ties = torch.tensor([[3.0, 1.0, 3.0, 3.0]])
    assert top_k_filter(ties, 2).tolist() == [[3.0, NEG_INF, 3.0, 3.0]]  # ties with the k-th survive


def test_top_p_on_a_hand_made_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.79) == [True, True, False, False]  # 0.5 + 0.3 >= 0.79
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]  # the top token always survives
    assert kept(1.0) == [True, True, True, True]
    shuffled = logits[:, [2, 0, 3, 1]]  # order in the vocabulary must not matter
    assert torch.isfinite(top_p_filter(shuffled, 0.79))[0].tolist() == [False, True, False, True]


@pytest.mark.parametrize("k, p", [(5, 1.0), (1, 1.0), (0, 0.9), (0, 0.3), (10, 0.6)])
def test_filters_match_hf_warpers(k, p):
    torch.manual_seed(1)
    logits = torch.randn(6, 50) * 2
    ours = top_p_filter(top_k_filter(logits, k), p)
    ref = logits.clone()
    if k:
        ref = TopKLogitsWarper(top_k=k)(None, ref)
    if p < 1.0:
        ref = TopPLogitsWarper(top_p=p)(None, ref)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


def test_repetition_penalty_matches_hf():
    torch.manual_seed(2)
    logits = torch.randn(3, 20)
    context = torch.randint(0, 20, (3, 7))
    seen = torch.zeros(3, 20, dtype=torch.bool).scatter(1, context, True)
    ref = RepetitionPenaltyLogitsProcessor(penalty=1.7)(context, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.7), ref)


def test_inverse_cdf_sampling_follows_the_distribution_and_respects_filters():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log()[None].repeat(4000, 1)  # 4000 independent rows of the same law
    gens = make_generators(123, [(0, s) for s in range(4000)])
    counts = torch.bincount(sample_from_logits(logits, gens), minlength=4).float()
    assert counts[1] == 0
    # chi-square with 2 d.o.f. (zero-probability cell excluded); 13.8 is the 0.1% critical value
    expected = probs[[0, 2, 3]] * 4000
    chi2 = ((counts[[0, 2, 3]] - expected) ** 2 / expected).sum().item()
    assert chi2 < 13.8


def test_row_generators_are_reproducible_and_distinct():
    rows = [(p, s) for p in range(3) for s in range(4)]
    assert len({row_seed(7, p, s) for p, s in rows}) == len(rows)
    draws = lambda seed: [torch.rand(3, generator=g).tolist() for g in make_generators(seed, rows)]  # noqa: E731
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    torch.manual_seed(5)
    a = draws(None)
    torch.manual_seed(5)
    assert draws(None) == a  # seed=None follows torch's global RNG


def test_select_next_tokens_greedy_and_temperature_limit():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    greedy = select_next_tokens(logits, SamplingParams(), [])
    assert greedy.tolist() == [1, 0]
    cold = SamplingParams(temperature=1e-3, seed=0)
    gens = make_generators(0, [(0, 0), (1, 0)])
    assert select_next_tokens(logits, cold, gens).tolist() == [1, 0]
    seen = torch.tensor([[False, True, False], [False, False, False]])
    penalized = select_next_tokens(logits, SamplingParams(repetition_penalty=4.0), [], seen)
    assert penalized.tolist() == [2, 0]  # 2.0 / 4 = 0.5 < 1.0


def _full_inverse_cdf(logits: torch.Tensor, generators) -> torch.Tensor:
    """Reference: one float64 prefix sum over the whole vocabulary (what the two-level search replaces)."""
    cdf = logits.float().softmax(-1).double().cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])[:, None]
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def test_two_level_inverse_cdf_equals_the_full_prefix_sum_draw():
    torch.manual_seed(0)
    V = 1000  # not a multiple of the block size: the padded tail must never be drawn
    logits = torch.randn(300, V) * 4  # peaked rows
    logits[:100, 500:] = float("-inf")  # filtered tokens (whole blocks and a block's tail)
    logits[100:200, ::3] = float("-inf")
    rows = [(0, s) for s in range(300)]
    ours = sample_from_logits(logits, make_generators(9, rows))
    ref = _full_inverse_cdf(logits, make_generators(9, rows))
    assert torch.equal(ours, ref)
    assert bool(torch.isfinite(logits.gather(1, ours[:, None])).all())  # never a filtered token
