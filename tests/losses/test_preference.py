"""Preference losses: hand-derived values, properties, registry and combination.

The hand-derived tests use one batch of two pairs, chosen so every loss lands on clean numbers:

    pair A: policy_c = -2, ref_c = -3  ->  r_c = +1;   policy_r = -4, ref_r = -3  ->  r_r = -1
    pair B: policy_c = -6, ref_c = -5  ->  r_c = -1;   policy_r = -5, ref_r = -6  ->  r_r = +1
    lengths: chosen (2, 2), rejected (4, 4)

so h = r_c - r_r is +2 for A and -2 for B, and with beta = 0.5, beta * h = +1 / -1.
``softplus(x) = log(1 + e^x) = -log sigmoid(-x)`` is written out with ``math`` below.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.errors import UserError
from posttrain.losses import preference as P
from posttrain.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    RunningMean,
    combine_losses,
    get_preference_loss,
    implicit_rewards,
    needs_reference,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand_batch(dtype: torch.dtype = torch.float64) -> PreferenceLogps:
    def t(*values: float) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype)

    return PreferenceLogps(
        policy_chosen=t(-2, -6), policy_rejected=t(-4, -5), chosen_lengths=torch.tensor([2, 2]),
        rejected_lengths=torch.tensor([4, 4]), ref_chosen=t(-3, -5), ref_rejected=t(-3, -6),
    )


def check(losses: torch.Tensor, expected: list[float]) -> None:
    assert losses.shape == (len(expected),)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=losses.dtype), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Hand-derived values


def test_dpo_hand_values() -> None:
    """-log s(beta h) = softplus(-beta h): softplus(-1) for A, softplus(1) for B."""
    losses, stats = P.dpo_loss(hand_batch(), beta=0.5)
    check(losses, [softplus(-1), softplus(1)])
    check(stats["chosen_rewards"], [0.5, -0.5])
    check(stats["rejected_rewards"], [-0.5, 0.5])
    check(stats["margin"], [1.0, -1.0])
    check(stats["accuracy"], [1.0, 0.0])


def test_cdpo_hand_values() -> None:
    """eps = 0.25: 0.75 softplus(-beta h) + 0.25 softplus(beta h)."""
    losses, _ = P.dpo_loss(hand_batch(), beta=0.5, label_smoothing=0.25)
    check(losses, [0.75 * softplus(-1) + 0.25 * softplus(1), 0.75 * softplus(1) + 0.25 * softplus(-1)])


def test_robust_dpo_hand_values() -> None:
    """[(1-eps) softplus(-beta h) - eps softplus(beta h)] / (1 - 2 eps), eps = 0.25."""
    losses, _ = P.robust_dpo_loss(hand_batch(), beta=0.5, label_smoothing=0.25)
    check(losses, [(0.75 * softplus(-1) - 0.25 * softplus(1)) / 0.5, (0.75 * softplus(1) - 0.25 * softplus(-1)) / 0.5])


def test_ipo_hand_values() -> None:
    """Summed (eq. 17): (h - 1/(2 beta))^2 = (2 - 1)^2 and (-2 - 1)^2.
    Length-normalised: h' = r_c/2 - r_r/4 = 0.75 (A), -0.75 (B): (0.75 - 1)^2, (-1.75)^2."""
    check(P.ipo_loss(hand_batch(), beta=0.5, length_normalize=False)[0], [1.0, 9.0])
    losses, stats = P.ipo_loss(hand_batch(), beta=0.5)
    check(losses, [0.0625, 3.0625])
    check(stats["chosen_rewards"], [0.25, -0.25])


def test_hinge_hand_values() -> None:
    """max(0, 1 - beta h): beta 0.5 gives 0 and 2; beta 0.25 gives 0.5 and 1.5."""
    check(P.hinge_loss(hand_batch(), beta=0.5)[0], [0.0, 2.0])
    check(P.hinge_loss(hand_batch(), beta=0.25)[0], [0.5, 1.5])


def test_dpo_norm_hand_values() -> None:
    """Per-token log-ratios: A: r_c/2 = 0.5, r_r/4 = -0.25, h' = 0.75; with beta = 4, beta h' = 3."""
    losses, stats = P.dpo_norm_loss(hand_batch(), beta=4.0)
    check(losses, [softplus(-3), softplus(3)])
    check(stats["chosen_rewards"], [2.0, -2.0])
    check(stats["rejected_rewards"], [-1.0, 1.0])


def test_rpo_hand_values() -> None:
    """DPO + alpha * (-policy_c / len_c): NLL is 2/2 = 1 (A) and 6/2 = 3 (B); alpha = 2."""
    losses, stats = P.rpo_loss(hand_batch(), beta=0.5, alpha=2.0)
    check(losses, [softplus(-1) + 2.0, softplus(1) + 6.0])
    check(stats["nll"], [1.0, 3.0])
    # With an explicit normaliser L = 4 the NLL is policy_c / 4.
    check(P.rpo_loss(hand_batch(), beta=0.5, alpha=2.0, nll_length_normaliser=4.0)[0],
          [softplus(-1) + 1.0, softplus(1) + 3.0])


def test_simpo_hand_values() -> None:
    """Mean logps: A: c = -1, r = -1; B: c = -3, r = -1.25. beta = 2, gamma = 0.5:
    A: 2 * 0 - 0.5 = -0.5 -> softplus(0.5); B: 2 * (-1.75) - 0.5 = -4 -> softplus(4)."""
    losses, stats = P.simpo_loss(hand_batch(), beta=2.0, gamma=0.5)
    check(losses, [softplus(0.5), softplus(4)])
    check(stats["chosen_rewards"], [-2.0, -6.0])
    check(stats["rejected_rewards"], [-2.0, -2.5])
    check(stats["accuracy"], [0.0, 0.0])  # a tie is not a win


def test_cpo_hand_values() -> None:
    """-log s(beta (pi_c - pi_r)) + alpha * NLL; beta = 0.5: A: 0.5 * 2 = 1, B: 0.5 * -1 = -0.5."""
    losses, stats = P.cpo_loss(hand_batch(), beta=0.5, alpha=1.0)
    check(losses, [softplus(-1) + 1.0, softplus(0.5) + 3.0])
    check(stats["chosen_rewards"], [-1.0, -3.0])


def test_orpo_hand_values() -> None:
    """log odds(m) = m - log(1 - e^m) for mean logp m.
    A: m_c = m_r = -1, so the log odds ratio is 0: NLL 1 + beta * log 2.
    B: m_c = -3, m_r = -1.25: ratio = -1.75 - log(1 - e^-3) + log(1 - e^-1.25)."""
    beta = 0.1
    ratio_b = -1.75 - math.log(1 - math.exp(-3)) + math.log(1 - math.exp(-1.25))
    losses, stats = P.orpo_loss(hand_batch(), beta=beta)
    check(losses, [1.0 + beta * math.log(2), 3.0 + beta * softplus(-ratio_b)])
    check(stats["log_odds_ratio"], [0.0, ratio_b])
    check(stats["nll"], [1.0, 3.0])
    check(P.orpo_loss(hand_batch(), beta=beta, nll_weight=0.0)[0], [beta * math.log(2), beta * softplus(-ratio_b)])


def test_orpo_is_finite_at_probability_one() -> None:
    """A mean logp of exactly 0 means infinite odds; the loss and its gradient stay finite."""
    policy_chosen = torch.tensor([0.0], requires_grad=True)
    batch = PreferenceLogps(policy_chosen, torch.tensor([-1.0]), torch.tensor([3]), torch.tensor([3]))
    losses, _ = P.orpo_loss(batch)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy_chosen.grad).all()


def test_apo_hand_values() -> None:
    """beta r_c = +-0.5, beta r_r = -+0.5.
    zero: 1 - s(beta r_c) + s(beta r_r); down: s(beta r_c) + 1 - s(beta (r_c - r_r))."""
    check(P.apo_zero_loss(hand_batch(), beta=0.5)[0],
          [1 - sigmoid(0.5) + sigmoid(-0.5), 1 - sigmoid(-0.5) + sigmoid(0.5)])
    check(P.apo_down_loss(hand_batch(), beta=0.5)[0],
          [sigmoid(0.5) + 1 - sigmoid(1), sigmoid(-0.5) + 1 - sigmoid(-1)])


def test_exo_pair_hand_values() -> None:
    """q = s(beta h) = s(1) for A: q (log q - log(1-eps)) + (1-q) (log(1-q) - log eps)."""
    eps = 0.01

    def kl(q: float) -> float:
        return q * (math.log(q) - math.log(1 - eps)) + (1 - q) * (math.log(1 - q) - math.log(eps))

    check(P.exo_pair_loss(hand_batch(), beta=0.5, label_smoothing=eps)[0], [kl(sigmoid(1)), kl(sigmoid(-1))])


def test_nca_pair_hand_values() -> None:
    """-log s(x_c) - 0.5 log s(-x_c) - 0.5 log s(-x_r), x = beta r:
    A: softplus(-0.5) + 0.5 softplus(0.5) + 0.5 softplus(-0.5)."""
    check(P.nca_pair_loss(hand_batch(), beta=0.5)[0],
          [1.5 * softplus(-0.5) + 0.5 * softplus(0.5), 1.5 * softplus(0.5) + 0.5 * softplus(-0.5)])


def test_bco_pair_hand_values() -> None:
    """-log s(beta r_c - delta) - log s(-(beta r_r - delta)).
    delta = 0: A: 2 softplus(-0.5). delta = 0.5: A: softplus(0) + softplus(-1) = log 2 + softplus(-1)."""
    check(P.bco_pair_loss(hand_batch(), beta=0.5)[0], [2 * softplus(-0.5), 2 * softplus(0.5)])
    check(P.bco_pair_loss(hand_batch(), beta=0.5, reward_shift=0.5)[0],
          [math.log(2) + softplus(-1), softplus(1) + softplus(0)])


def test_sppo_hard_hand_values() -> None:
    """(r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2, beta = 0.5: A hits both targets (0);
    B: (-1 - 1)^2 + (1 + 1)^2 = 8."""
    check(P.sppo_hard_loss(hand_batch(), beta=0.5)[0], [0.0, 8.0])


def test_discopop_hand_values() -> None:
    """rho = +-1, tau = 0.05: (1 - s(rho/tau)) softplus(-rho) + s(rho/tau) e^-rho."""

    def expected(rho: float, tau: float) -> float:
        return (1 - sigmoid(rho / tau)) * softplus(-rho) + sigmoid(rho / tau) * math.exp(-rho)

    check(P.discopop_loss(hand_batch(), beta=0.5, tau=0.05)[0], [expected(1, 0.05), expected(-1, 0.05)])
    check(P.discopop_loss(hand_batch(), beta=0.5, tau=2.0)[0], [expected(1, 2.0), expected(-1, 2.0)])


def test_discopop_stays_finite_where_trl_formula_overflows() -> None:
    """rho = -100 in fp32: TRL's exp(-rho) * s(rho/tau) is inf * 0 = NaN. The true value is
    softplus(100) * (1 - s(-2000)) + e^100 * s(-2000), i.e. ~100."""
    batch = PreferenceLogps(torch.tensor([-200.0]), torch.tensor([0.0]), torch.tensor([1]), torch.tensor([1]),
                            torch.tensor([0.0]), torch.tensor([0.0]))
    rho = torch.tensor(-100.0)
    trl_formula = -torch.nn.functional.logsigmoid(rho) * (1 - torch.sigmoid(rho / 0.05)) + torch.exp(-rho) * torch.sigmoid(
        rho / 0.05
    )
    assert torch.isnan(trl_formula)
    losses, _ = P.discopop_loss(batch, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([100.0]))


def test_sft_hand_values() -> None:
    """-policy_c / len_c = 1 and 3; with normaliser 4: 0.5 and 1.5. Rewards: mean token logps."""
    losses, stats = P.sft_loss(hand_batch())
    check(losses, [1.0, 3.0])
    check(stats["chosen_rewards"], [-1.0, -3.0])
    check(stats["rejected_rewards"], [-1.0, -1.25])
    check(P.sft_loss(hand_batch(), nll_length_normaliser=4.0)[0], [0.5, 1.5])


def test_implicit_rewards_and_running_mean() -> None:
    """Rewards beta * r = [0.5, -0.5 | -0.5, 0.5]; a running mean is count-weighted:
    mean of {1, 2, 3} then {6} = 12 / 4 = 3."""
    check(implicit_rewards(hand_batch(), beta=0.5), [0.5, -0.5, -0.5, 0.5])
    state = RunningMean().update(torch.tensor([1.0, 2.0, 3.0])).update(torch.tensor([6.0]))
    assert state.count == 4
    torch.testing.assert_close(torch.as_tensor(state.mean), torch.tensor(3.0))
    assert RunningMean().update(torch.tensor([])) == RunningMean()


def test_bco_reward_shift_is_a_constant() -> None:
    shift = torch.tensor(0.3, requires_grad=True)
    policy_chosen = torch.tensor([-2.0], requires_grad=True)
    batch = PreferenceLogps(policy_chosen, torch.tensor([-3.0]), torch.tensor([1]), torch.tensor([1]),
                            torch.tensor([-2.5]), torch.tensor([-2.5]))
    losses, _ = P.bco_pair_loss(batch, reward_shift=shift)
    losses.sum().backward()
    assert shift.grad is None and policy_chosen.grad is not None


# --------------------------------------------------------------------------------------------
# Properties

REFERENCE_FREE = {"simpo", "cpo", "orpo", "sft"}
# Raising the chosen logp never raises these losses (strictly lowers them, except hinge past its
# margin, where it is flat).
MONOTONE = {"dpo", "robust_dpo", "hinge", "dpo_norm", "rpo", "simpo", "cpo", "orpo", "apo_zero", "bco_pair", "sft"}
# ...and these are exceptions, each demonstrated in test_non_monotone_exceptions:
NON_MONOTONE = {"ipo", "sppo_hard", "exo_pair", "nca_pair", "apo_down", "discopop"}


def test_every_loss_is_classified() -> None:
    assert set(PREFERENCE_LOSSES.names()) == MONOTONE | NON_MONOTONE
    assert {n for n in PREFERENCE_LOSSES.names() if not get_preference_loss(n).needs_reference} == REFERENCE_FREE


@st.composite
def batches(draw: st.DrawFn, low: float = -50.0, dtype: torch.dtype = torch.float64) -> PreferenceLogps:
    size = draw(st.integers(1, 4))
    logp = st.floats(low, 0.0, allow_nan=False, allow_infinity=False)

    def tensor(strategy: st.SearchStrategy) -> torch.Tensor:
        return torch.tensor(draw(st.lists(strategy, min_size=size, max_size=size)), dtype=dtype)

    lengths = st.integers(1, 20)
    return PreferenceLogps(tensor(logp), tensor(logp), tensor(lengths).long(), tensor(lengths).long(),
                           tensor(logp), tensor(logp))


def with_grad(batch: PreferenceLogps) -> PreferenceLogps:
    return PreferenceLogps(
        batch.policy_chosen.clone().requires_grad_(), batch.policy_rejected.clone().requires_grad_(),
        batch.chosen_lengths, batch.rejected_lengths,
        batch.ref_chosen.clone().requires_grad_(), batch.ref_rejected.clone().requires_grad_(),
    )


@pytest.mark.parametrize("name", sorted(MONOTONE))
@settings(max_examples=40, deadline=None)
@given(batch=batches())
def test_raising_the_chosen_logp_lowers_the_loss(name: str, batch: PreferenceLogps) -> None:
    batch = with_grad(batch)
    losses, _ = PREFERENCE_LOSSES.get(name)(batch)
    (gradient,) = torch.autograd.grad(losses.sum(), batch.policy_chosen)
    assert (gradient <= 0).all(), gradient
    if name != "hinge":
        assert (gradient < 0).all(), gradient


def test_non_monotone_exceptions() -> None:
    """Raising the chosen logp raises these losses somewhere, by their design:
    squared targets (ipo, sppo_hard), a finite optimum (exo_pair at s(beta h) = 1 - eps, cDPO),
    NCA's absolute term past beta r_c = log 2, APO-down lowering the chosen likelihood, and
    DiscoPOP's non-monotone blend near rho = 0."""
    def gradient(name: str, chosen_logratio: float, rejected_logratio: float = 0.0, **params: object) -> float:
        policy_chosen = torch.tensor([chosen_logratio], dtype=torch.float64, requires_grad=True)
        policy_rejected = torch.tensor([rejected_logratio], dtype=torch.float64)
        zero = torch.zeros(1, dtype=torch.float64)
        batch = PreferenceLogps(policy_chosen, policy_rejected, torch.tensor([1]), torch.tensor([1]), zero, zero)
        losses, _ = PREFERENCE_LOSSES.get(name)(batch, **params)
        return torch.autograd.grad(losses.sum(), policy_chosen)[0].item()

    assert gradient("ipo", 100.0) > 0
    assert gradient("sppo_hard", 100.0) > 0
    assert gradient("exo_pair", 100.0) > 0
    assert gradient("nca_pair", 100.0) > 0
    assert gradient("apo_down", 0.0, 10.0) > 0
    assert gradient("discopop", -1.0, beta=0.1) > 0  # rho = -0.1
    assert gradient("dpo", 100.0, label_smoothing=0.1) > 0


@pytest.mark.parametrize("name", sorted(set(PREFERENCE_LOSSES.names()) - REFERENCE_FREE))
@settings(max_examples=10, deadline=None)
@given(batch=batches())
def test_no_gradient_reaches_the_reference(name: str, batch: PreferenceLogps) -> None:
    batch = with_grad(batch)
    losses, stats = PREFERENCE_LOSSES.get(name)(batch)
    losses.sum().backward()
    assert batch.ref_chosen.grad is None and batch.ref_rejected.grad is None
    assert batch.policy_chosen.grad is not None
    assert not any(value.requires_grad for value in stats.values())


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
@settings(max_examples=10, deadline=None)
@given(batch=batches())
def test_reference_free_losses_ignore_the_reference(name: str, batch: PreferenceLogps) -> None:
    without = PreferenceLogps(batch.policy_chosen, batch.policy_rejected, batch.chosen_lengths, batch.rejected_lengths)
    with_ref_losses, with_ref_stats = PREFERENCE_LOSSES.get(name)(batch)
    without_losses, without_stats = PREFERENCE_LOSSES.get(name)(without)
    torch.testing.assert_close(with_ref_losses, without_losses, rtol=0, atol=0)
    for key in with_ref_stats:
        torch.testing.assert_close(with_ref_stats[key], without_stats[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", PREFERENCE_LOSSES.names())
@settings(max_examples=25, deadline=None)
@given(batch=batches(low=-1e6, dtype=torch.float32))
def test_losses_and_gradients_are_finite_for_large_logps(name: str, batch: PreferenceLogps) -> None:
    batch = with_grad(batch)
    losses, stats = PREFERENCE_LOSSES.get(name)(batch)
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    for gradient in (batch.policy_chosen.grad, batch.policy_rejected.grad):
        assert gradient is None or torch.isfinite(gradient).all()  # sft never reads the rejected logp
    assert all(torch.isfinite(value).all() for value in stats.values())


@pytest.mark.parametrize("name", PREFERENCE_LOSSES.names())
def test_micro_batches_sum_to_the_full_batch(name: str) -> None:
    """Per-pair losses use nothing from other pairs, so sum over micro-batches / global count
    equals the full-batch mean (the reduction the caller does)."""
    generator = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 6, generator=generator, dtype=torch.float64) * 20
    lengths = torch.randint(1, 10, (2, 6), generator=generator)
    full = PreferenceLogps(logps[0], logps[1], lengths[0], lengths[1], logps[2], logps[3])
    loss = PREFERENCE_LOSSES.get(name)
    full_mean = loss(full)[0].mean()
    micro_sum = sum(
        loss(PreferenceLogps(logps[0, s], logps[1, s], lengths[0, s], lengths[1, s], logps[2, s], logps[3, s]))[0].sum()
        for s in (slice(0, 2), slice(2, 5), slice(5, 6))
    )
    torch.testing.assert_close(micro_sum / 6, full_mean)


def test_half_precision_inputs_are_computed_in_fp32() -> None:
    losses, stats = P.dpo_loss(hand_batch(torch.bfloat16), beta=0.5)
    assert losses.dtype == torch.float32 and stats["margin"].dtype == torch.float32
    torch.testing.assert_close(losses, torch.tensor([softplus(-1), softplus(1)]))


# --------------------------------------------------------------------------------------------
# Validation, registry, combination


def test_batch_validation() -> None:
    one, two = torch.zeros(1), torch.zeros(2)
    with pytest.raises(ValueError, match="shape"):
        PreferenceLogps(two, one, two, two)
    with pytest.raises(ValueError, match=r"\[B\]"):
        PreferenceLogps(torch.zeros(2, 3), torch.zeros(2, 3), two, two)
    with pytest.raises(ValueError, match="both"):
        PreferenceLogps(two, two, two, two, ref_chosen=two)


def test_reference_losses_say_which_loss_needs_the_reference() -> None:
    batch = PreferenceLogps(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="'ipo' needs reference"):
        P.ipo_loss(batch)


def test_parameter_ranges_are_checked() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        P.robust_dpo_loss(hand_batch(), label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        P.exo_pair_loss(hand_batch(), label_smoothing=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        P.dpo_loss(hand_batch(), label_smoothing=0.6)
    with pytest.raises(TypeError):
        P.sft_loss(hand_batch(), beta=0.1)  # an unused parameter is an error, never a no-op


PEER_ALIASES = {
    # TRL DPOTrainer loss_type
    "sigmoid": "dpo", "robust": "robust_dpo", "ipo": "ipo", "hinge": "hinge", "sigmoid_norm": "dpo_norm",
    "sft": "sft", "apo_zero": "apo_zero", "apo_down": "apo_down", "exo_pair": "exo_pair",
    "nca_pair": "nca_pair", "bco_pair": "bco_pair", "sppo_hard": "sppo_hard", "discopop": "discopop",
    # open-instruct dpo_loss_type
    "dpo": "dpo", "dpo_norm": "dpo_norm", "simpo": "simpo",
    # TRL experimental trainers
    "orpo": "orpo", "cpo": "cpo",
}


@pytest.mark.parametrize(("peer", "ours"), sorted(PEER_ALIASES.items()))
def test_peer_names_resolve(peer: str, ours: str) -> None:
    assert PREFERENCE_LOSSES.canonical(peer) == ours
    assert get_preference_loss(peer).name == ours


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(UserError) as caught:
        get_preference_loss("sigmod", "stages.dpo.loss.name")
    message = str(caught.value.problems[0].render())
    assert "did you mean 'sigmoid'" in message and "simpo" in message and "stages.dpo.loss.name" in message


def test_user_losses_import_lazily() -> None:
    loss = get_preference_loss("posttrain.losses.preference:sft_loss")
    assert loss.needs_reference  # a plain function is assumed to need one unless it says otherwise
    check(loss(hand_batch())[0], [1.0, 3.0])


def test_needs_reference_and_params() -> None:
    assert not needs_reference(["simpo", "sft"])
    assert needs_reference(["sft", "sigmoid"])
    assert get_preference_loss("simpo").params == {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0}


def test_combine_losses_weights_and_prefixes() -> None:
    """0.8 DPO + 0.2 BCO + 1.0 SFT (TRL's MPO example): per pair the weighted sum."""
    batch = hand_batch()
    losses, stats = combine_losses(batch, [("sigmoid", 0.8, {"beta": 0.5}), ("bco_pair", 0.2, {"beta": 0.5}),
                                           ("sft", 1.0, {})])
    check(losses, [0.8 * softplus(-1) + 0.2 * 2 * softplus(-0.5) + 1.0, 0.8 * softplus(1) + 0.2 * 2 * softplus(0.5) + 3.0])
    check(stats["dpo/loss"], [softplus(-1), softplus(1)])
    check(stats["bco_pair/margin"], [1.0, -1.0])
    check(stats["sft/nll"], [1.0, 3.0])
    assert not any(value.requires_grad for value in stats.values())


def test_combine_losses_names_repeats_and_rejects_empty() -> None:
    _, stats = combine_losses(hand_batch(), [("dpo", 1.0, {"beta": 0.5}), ("dpo", 1.0, {"beta": 0.25})])
    check(stats["dpo/chosen_rewards"], [0.5, -0.5])
    check(stats["dpo_1/chosen_rewards"], [0.25, -0.25])
    with pytest.raises(ValueError, match="at least one"):
        combine_losses(hand_batch(), [])


def test_a_user_object_that_is_not_callable_is_a_user_error() -> None:
    with pytest.raises(UserError, match="not callable"):
        get_preference_loss("posttrain.losses.preference:PREFERENCE_LOSSES")
