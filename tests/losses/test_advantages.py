"""Advantage estimators: hand-derived values, invariants, TRL 1.16 parity, masking, names.

Also the DAPO filters of ``posttrain.losses.rl_filters`` (dynamic sampling is the statement
"this group's advantages are all zero").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from posttrain.errors import UserError
from posttrain.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    outcome_advantages,
    outcome_token_rewards,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)
from posttrain.losses.rl_filters import groups_with_signal, mask_rows, overlong_filter

OUTCOME = ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]

# ---------------------------------------------------------------------------------------------
# GRPO: the G = 16, 4 successes hand case


def sixteen_with_four_successes() -> torch.Tensor:
    return torch.tensor([[1.0] * 4 + [0.0] * 12], dtype=torch.float64)


def test_grpo_hand_case_population_std() -> None:
    """G = 16, 4 successes (reward 1), 12 failures (0). mean = 4/16 = 1/4.
    Sum of squared deviations = 4 (3/4)^2 + 12 (1/4)^2 = 36/16 + 12/16 = 3.

    *Population* std (divide by G = 16): var = 3/16, std = sqrt(3)/4 = 0.4330.
        success: (3/4) / (sqrt(3)/4) = sqrt(3) = +1.732
        failure: (-1/4) / (sqrt(3)/4) = -1/sqrt(3) = -0.577
    So the often-quoted +1.73 / -0.58 is the population-std convention (eps = 0).
    """
    advantages = grpo_advantages(sixteen_with_four_successes(), unbiased_std=False, eps=0.0)
    assert advantages[0, 0].item() == pytest.approx(math.sqrt(3), abs=1e-12)
    assert advantages[0, 4].item() == pytest.approx(-1 / math.sqrt(3), abs=1e-12)
    assert advantages[0, 0].item() == pytest.approx(1.73, abs=5e-3)
    assert advantages[0, 4].item() == pytest.approx(-0.58, abs=5e-3)


def test_grpo_hand_case_sample_std_is_the_default_like_trl() -> None:
    """Same rewards, *sample* std (divide by G - 1 = 15; TRL's ``nanstd`` and verl's torch.std):
    var = 3/15 = 0.2, std = 0.4472.
        success: 0.75 / (0.4472 + 1e-4) = +1.6767   (eps = 0: 0.75 / 0.4472 = +1.6771)
        failure: -0.25 / (0.4472 + 1e-4) = -0.5589  (eps = 0: -0.5590)
    The default (unbiased std, eps = 1e-4 added to the std) therefore does NOT give 1.73 / -0.58.
    """
    advantages = grpo_advantages(sixteen_with_four_successes())
    std = math.sqrt(0.2)
    assert advantages[0, 0].item() == pytest.approx(0.75 / (std + 1e-4), abs=1e-12)
    assert advantages[0, 4].item() == pytest.approx(-0.25 / (std + 1e-4), abs=1e-12)
    assert advantages[0, 0].item() == pytest.approx(1.6767, abs=1e-4)
    assert advantages[0, 4].item() == pytest.approx(-0.5589, abs=1e-4)


def test_grpo_zero_variance_group_gets_zero() -> None:
    advantages = grpo_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.3, 0.3, 0.3]]))
    assert torch.equal(advantages, torch.zeros(2, 3))


def test_grpo_is_invariant_to_affine_reward_changes() -> None:
    rewards = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        grpo_advantages(rewards, eps=0.0), grpo_advantages(3.0 * rewards - 7.0, eps=0.0)
    )


# ---------------------------------------------------------------------------------------------
# RLOO, Dr. GRPO


def test_rloo_hand_case() -> None:
    """G = 3, rewards (1, 0, 2). Leave-one-out baselines: (0 + 2)/2 = 1, (1 + 2)/2 = 1.5,
    (1 + 0)/2 = 0.5, so advantages 1 - 1 = 0, 0 - 1.5 = -1.5, 2 - 0.5 = +1.5."""
    advantages = rloo_advantages(torch.tensor([[1.0, 0.0, 2.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[0.0, -1.5, 1.5]]))


def test_rloo_is_dr_grpo_scaled_by_g_over_g_minus_1() -> None:
    rewards = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rloo_advantages(rewards), 6 / 5 * dr_grpo_advantages(rewards))


def test_dr_grpo_hand_case() -> None:
    """No std division: rewards (1, 0, 0, 0), mean 1/4 -> (3/4, -1/4, -1/4, -1/4)."""
    advantages = dr_grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


# ---------------------------------------------------------------------------------------------
# REINFORCE++, ReMax


def test_reinforce_pp_hand_case() -> None:
    """No group baseline; whole batch (P = 2, G = 2) rewards (1, 0, 0, 0): mean 1/4,
    Bessel var = (9/16 + 3/16) / 3 = 1/4, std 1/2 -> (1 - 1/4) / (1/2) = 1.5 and -0.5 for the rest
    (eps = 1e-8 under the square root changes the 9th digit)."""
    advantages = reinforce_pp_advantages(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(advantages, torch.tensor([[1.5, -0.5], [-0.5, -0.5]], dtype=torch.float64))


def test_reinforce_pp_baseline_hand_case() -> None:
    """Group means 1/2 and 1 -> centred (1/2, -1/2, 0, 0); batch mean 0, Bessel var
    (1/4 + 1/4) / 3 = 1/6 -> +-(1/2) sqrt(6) = +-1.2247, and 0 for the all-correct group."""
    advantages = reinforce_pp_baseline_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    half_root_six = 0.5 * math.sqrt(6)
    expected = torch.tensor([[half_root_six, -half_root_six], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected)


def test_reinforce_pp_with_token_counts_equals_whitening_over_tokens() -> None:
    """With lengths, each token weighs 1 - what verl/OpenRLHF get by whitening the broadcast
    returns over the token mask."""
    gen = torch.Generator().manual_seed(3)
    rewards = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, 6, (3, 4), generator=gen)
    mask = (torch.arange(6) < lengths.reshape(-1, 1)).to(torch.float64)
    per_token = rewards.reshape(-1, 1).expand(-1, 6)
    for estimator, centred in [
        (reinforce_pp_advantages, per_token),
        (reinforce_pp_baseline_advantages, (rewards - rewards.mean(-1, keepdim=True)).reshape(-1, 1).expand(-1, 6)),
    ]:
        ours = estimator(rewards, token_counts=lengths)
        whitened = masked_whiten(centred, mask)
        torch.testing.assert_close(ours.reshape(-1, 1).expand(-1, 6) * mask, whitened)


def test_remax_hand_case_and_missing_baseline() -> None:
    """A = r - r_greedy of the same prompt."""
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    advantages = remax_advantages(rewards, baseline_rewards=torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(advantages, torch.tensor([[0.5, -0.5], [-0.5, -0.5]]))
    with pytest.raises(ValueError, match="greedy"):
        remax_advantages(rewards)
    with pytest.raises(ValueError, match=r"\[P\]"):
        remax_advantages(rewards, baseline_rewards=torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# Masked samples (reward None upstream)


@pytest.mark.parametrize("name", OUTCOME + ["remax"])
def test_invalid_samples_get_zero_and_do_not_move_the_statistics(name: str) -> None:
    """Invalid entries hold NaN (a None reward): they get exactly 0 and the valid ones get what
    they would get with the invalid ones absent."""
    nan = float("nan")
    rewards = torch.tensor([[1.0, nan, 0.0, 0.5], [0.2, 0.9, nan, 0.4]], dtype=torch.float64)
    valid = ~torch.isnan(rewards)
    baseline = torch.tensor([0.3, 0.6], dtype=torch.float64)
    advantages = outcome_advantages(name, rewards, valid=valid, baseline_rewards=baseline)
    assert torch.equal(advantages[~valid], torch.zeros(2, dtype=torch.float64))
    assert not torch.isnan(advantages).any()
    # The same prompts with the invalid samples removed (G = 3 each).
    compact = rewards[valid].reshape(2, 3)
    expected = outcome_advantages(name, compact, baseline_rewards=baseline)
    torch.testing.assert_close(advantages[valid].reshape(2, 3), expected)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_groups_with_fewer_than_two_valid_samples_get_zero(name: str) -> None:
    """No group baseline without a second sample. (``reinforce_pp`` has no group baseline, so a
    lone valid sample is an ordinary member of the batch there.)"""
    rewards = torch.tensor([[1.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    advantages = outcome_advantages(name, rewards, valid=valid)
    assert torch.equal(advantages[1:], torch.zeros(2, 3))
    assert advantages[0].abs().sum() > 0


@pytest.mark.parametrize("name", OUTCOME + ["remax"])
def test_advantages_carry_no_gradient(name: str) -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    advantages = outcome_advantages(name, rewards, baseline_rewards=torch.tensor([0.2]))
    assert not advantages.requires_grad


# ---------------------------------------------------------------------------------------------
# Parity with TRL 1.16 (the advantage code sits inline in a 600-line method, so the same inputs
# go through TRL's own lines, quoted from GRPOTrainer / RLOOTrainer, with TRL's own nanstd).


def trl_grpo_advantages(rewards_pg: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16 ``GRPOTrainer._generate_and_score_completions``, sum_then_normalize branch,
    ``scale_rewards`` in ("group", "none"); NaN marks an unscorable completion."""
    from trl.trainer.utils import nanstd

    num_generations = rewards_pg.shape[1]
    rewards = rewards_pg.reshape(-1)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0).view_as(rewards_pg)


def trl_rloo_advantages(rewards_pg: torch.Tensor) -> torch.Tensor:
    """TRL 1.16 ``RLOOTrainer._generate_and_score_completions`` with normalize_advantages=False."""
    grouped_rewards = rewards_pg
    rewards = rewards_pg.reshape(-1)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    return torch.nan_to_num(rewards - baselines, nan=0.0).view_as(rewards_pg)


def parity_rewards() -> torch.Tensor:
    gen = torch.Generator().manual_seed(4)
    rewards = torch.rand(6, 8, generator=gen, dtype=torch.float64)
    rewards[1] = 1.0  # zero variance
    rewards[2, :4] = float("nan")  # unscorable samples
    rewards[3, 1:] = float("nan")  # a lone scorable sample
    rewards[4] = float("nan")  # nothing scorable
    rewards[5] = torch.tensor([1, 0, 0, 0, 0, 0, 1, 0], dtype=torch.float64)
    return rewards


@pytest.mark.parametrize(
    ("ours", "trl"),
    [
        (grpo_advantages, lambda r: trl_grpo_advantages(r, "group")),
        (dr_grpo_advantages, lambda r: trl_grpo_advantages(r, "none")),
        (rloo_advantages, trl_rloo_advantages),
    ],
    ids=["grpo=scale_rewards:group", "dr_grpo=scale_rewards:none", "rloo=RLOOTrainer"],
)
def test_parity_with_trl(
    ours: Callable[..., torch.Tensor], trl: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """To 1e-7, not 1e-12: TRL's ``nanstd`` computes its Bessel factor count / (count - 1) from
    integer tensors, which yields float32 even for float64 rewards (relative error ~1e-8)."""
    rewards = parity_rewards()
    valid = ~torch.isnan(rewards)
    torch.testing.assert_close(ours(rewards, valid=valid), trl(rewards), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------
# GAE


def test_gae_hand_case() -> None:
    """3 tokens, rewards (0, 0, 1), values (0.5, 0.4, 0.8), gamma 0.9, lam 0.5 (gamma lam 0.45).
    delta_2 = 1 + 0.9 * 0 - 0.8 = 0.2 (the episode ends: V after the last token is 0)
    delta_1 = 0 + 0.9 * 0.8 - 0.4 = 0.32
    delta_0 = 0 + 0.9 * 0.4 - 0.5 = -0.14
    A_2 = 0.2;  A_1 = 0.32 + 0.45 * 0.2 = 0.41;  A_0 = -0.14 + 0.45 * 0.41 = 0.0445
    returns = A + V = (0.5445, 0.81, 1.0)
    """
    advantages, returns = gae(
        torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64),
        torch.tensor([[0.5, 0.4, 0.8]], dtype=torch.float64),
        torch.ones(1, 3),
        gamma=0.9,
        lam=0.5,
    )
    torch.testing.assert_close(advantages, torch.tensor([[0.0445, 0.41, 0.2]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[0.5445, 0.81, 1.0]], dtype=torch.float64))


def test_gae_right_padding_matches_the_unpadded_row() -> None:
    """Garbage rewards/values after the last valid token change nothing; outputs there are 0."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0, -9.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.8, 7.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    short_adv, short_ret = gae(rewards[:, :3], values[:, :3], mask[:, :3], gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages[:, :3], short_adv)
    torch.testing.assert_close(returns[:, :3], short_ret)
    assert torch.equal(advantages[:, 3:], torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(returns[:, 3:], torch.zeros(1, 2, dtype=torch.float64))


def test_gae_skips_interior_masked_tokens() -> None:
    """A masked span (tool output) is skipped: the row equals the row without it."""
    rewards = torch.tensor([[0.1, 5.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 9.0, 0.4, 0.8]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1]])
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.7)
    kept = torch.tensor([0, 2, 3])
    expected, _ = gae(rewards[:, kept], values[:, kept], torch.ones(1, 3), gamma=0.9, lam=0.7)
    torch.testing.assert_close(advantages[:, kept], expected)
    assert advantages[0, 1] == 0


def test_gae_equals_the_sum_of_discounted_td_errors() -> None:
    """Vectorised recursion = eq. 16 written out as a double loop, on ragged rows."""
    gen = torch.Generator().manual_seed(5)
    rows, tokens, gamma, lam = 4, 6, 0.97, 0.9
    rewards = torch.randn(rows, tokens, generator=gen, dtype=torch.float64)
    values = torch.randn(rows, tokens, generator=gen, dtype=torch.float64)
    lengths = [6, 3, 1, 5]
    mask = (torch.arange(tokens) < torch.tensor(lengths).unsqueeze(1)).long()
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for row, length in enumerate(lengths):
        v = values[row, :length].tolist() + [0.0]
        deltas = [rewards[row, t].item() + gamma * v[t + 1] - v[t] for t in range(length)]
        for t in range(length):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t))
            assert advantages[row, t].item() == pytest.approx(expected, abs=1e-12)
            assert returns[row, t].item() == pytest.approx(expected + v[t], abs=1e-12)


def test_gae_with_gamma_lam_one_is_monte_carlo() -> None:
    rewards = torch.tensor([[0.2, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.3, 0.6, 0.1]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    reward_to_go = torch.tensor([[1.2, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(returns, reward_to_go)
    torch.testing.assert_close(advantages, reward_to_go - values)
    torch.testing.assert_close(discounted_returns(rewards, torch.ones(1, 3)), reward_to_go)


def test_masked_whiten() -> None:
    gen = torch.Generator().manual_seed(6)
    values = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 4 + 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    whitened = masked_whiten(values, mask)
    kept = whitened[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert kept.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(whitened[~mask.bool()], torch.zeros(6, dtype=torch.float64))
    rescaled = masked_whiten(values, mask, shift_mean=False)[mask.bool()]
    assert rescaled.mean().item() == pytest.approx(values[mask.bool()].mean().item(), abs=1e-12)


def test_outcome_token_rewards_sit_on_the_last_valid_token() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    rewards = outcome_token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_names_aliases_and_flags() -> None:
    assert ADVANTAGE_ESTIMATORS.names() == sorted(OUTCOME + ["remax", "gae"])
    assert ADVANTAGE_ESTIMATORS.canonical("group_norm") == "grpo"
    assert ADVANTAGE_ESTIMATORS.canonical("reinforce_plus_plus") == "reinforce_pp"
    assert ADVANTAGE_ESTIMATORS.canonical("reinforce_plus_plus_baseline") == "reinforce_pp_baseline"
    assert ADVANTAGE_ESTIMATORS.canonical("reinforce_baseline") == "reinforce_pp_baseline"
    assert ADVANTAGE_ESTIMATORS.get("remax").needs_baseline_rewards
    assert ADVANTAGE_ESTIMATORS.get("gae").needs_values
    assert ADVANTAGE_ESTIMATORS.get("gae").level == "token"
    assert not any(ADVANTAGE_ESTIMATORS.get(name).needs_baseline_rewards for name in OUTCOME)


def test_registry_miss_and_token_level_misuse() -> None:
    rewards = torch.zeros(1, 2)
    with pytest.raises(UserError, match="valid names: dr_grpo, gae, grpo"):
        outcome_advantages("gpro", rewards)
    with pytest.raises(UserError, match="gae"):
        outcome_advantages("gae", rewards)


def test_user_estimator_by_import_path() -> None:
    rewards = torch.tensor([[1.0, 0.0]])
    advantages = outcome_advantages("posttrain.losses.advantages:rloo_advantages", rewards)
    torch.testing.assert_close(advantages, torch.tensor([[1.0, -1.0]]))


def test_outcome_advantages_passes_options() -> None:
    rewards = sixteen_with_four_successes()
    advantages = outcome_advantages("grpo", rewards, unbiased_std=False, eps=0.0)
    assert advantages[0, 0].item() == pytest.approx(math.sqrt(3))


# ---------------------------------------------------------------------------------------------
# DAPO filters


def test_groups_with_signal() -> None:
    nan = float("nan")
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, nan, nan], [0.5, 0.5, 0.7]])
    valid = ~torch.isnan(rewards)
    keep = groups_with_signal(rewards, valid)
    assert keep.tolist() == [False, True, False, False, True]
    # Exactly the groups whose group-baseline advantages are not all zero.
    advantages = grpo_advantages(rewards, valid=valid)
    assert keep.tolist() == (advantages.abs().sum(-1) > 0).tolist()
    assert groups_with_signal(rewards, valid, atol=0.25).tolist() == [False, True, False, False, False]


def test_overlong_filter_and_mask_rows() -> None:
    keep = overlong_filter(torch.tensor([False, True, False]))
    assert keep.tolist() == [True, False, True]
    mask = torch.ones(3, 2)
    assert mask_rows(mask, keep).tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    assert mask_rows(mask.bool(), keep).tolist() == [[True, True], [False, False], [True, True]]
