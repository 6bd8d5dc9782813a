"""Pairwise preference losses (DPO and its relatives) as pure functions.

Every loss has the shape ``fn(batch: PreferenceLogps, *, <params>) -> (losses, stats)``:

- ``losses`` [B]: one loss per pair, *unreduced*. The caller reduces over the global batch
  (``losses.sum() / global_pair_count``), so micro-batching, gradient accumulation and process
  count never change the update.
- ``stats``: per-pair tensors [B], detached. Always ``chosen_rewards``, ``rejected_rewards``,
  ``margin`` (chosen - rejected) and ``accuracy`` (1.0 where the chosen reward is higher), plus
  loss-specific ones (``nll``, ``log_odds_ratio``).

Here B counts (prompt, chosen, rejected) pairs. A sequence logp is the sum of the response
tokens' log-probabilities given the prompt. Reference logps are constants: every loss detaches
them, so no gradient can reach them even if a caller forgets ``torch.no_grad``.

Names (``PREFERENCE_LOSSES``; our name first, then the aliases we accept for the same maths; we
alias only names a peer really uses, and never a name whose maths differs, such as TRL's
unpaired ``BCOTrainer`` or the reference-free SLiC loss):

============  ===================================  ==========================================
ours          aliases                              peers
============  ===================================  ==========================================
dpo           sigmoid                              TRL ``sigmoid``, open-instruct ``dpo``,
                                                   OpenRLHF default (``--label_smoothing`` =
                                                   our ``label_smoothing``: cDPO)
robust_dpo    robust                               TRL ``robust``
ipo           -                                    TRL ``ipo`` (length-normalised, our
                                                   default); OpenRLHF ``--ipo`` is
                                                   ``length_normalize=False``
hinge         -                                    TRL ``hinge``
dpo_norm      sigmoid_norm                         TRL ``sigmoid_norm``, open-instruct
                                                   ``dpo_norm``
rpo           -                                    TRL ``loss_type=[sigmoid, sft]`` with
                                                   ``loss_weights=[1, alpha]``; OpenRLHF
                                                   ``--nll_loss_coef alpha``
simpo         -                                    open-instruct ``simpo`` (its
                                                   ``gamma_beta_ratio`` r is our
                                                   ``gamma = r * beta``), TRL CPO ``simpo``
                                                   with ``cpo_alpha=0``
orpo          -                                    TRL ``ORPOTrainer`` (``beta`` = lambda)
cpo           -                                    TRL ``CPOTrainer`` ``sigmoid``
apo_zero      -                                    TRL ``apo_zero``
apo_down      -                                    TRL ``apo_down``
exo_pair      -                                    TRL ``exo_pair``
nca_pair      -                                    TRL ``nca_pair``
bco_pair      -                                    TRL ``bco_pair`` (with ``reward_shift=0``)
sppo_hard     -                                    TRL ``sppo_hard``
discopop      -                                    TRL ``discopop`` (``discopop_tau`` = ``tau``)
sft           -                                    TRL ``sft`` (see ``nll_length_normaliser``)
============  ===================================  ==========================================

How a peer's NLL coefficient is said here: OpenRLHF ``--nll_loss_coef c`` is loss ``rpo`` with
``alpha=c`` (both use the per-sequence token-mean NLL), or equivalently
``combine_losses(batch, [("dpo", 1.0, {...}), ("sft", c, {})])``.

Not implemented: TRL ``aot``/``aot_unpaired`` (they sort the batch, so one pair's loss depends on
the others in its micro-batch, which breaks micro-batch invariance), WPO weighting, LD-DPO's
``ld_alpha`` (a logp-computation option, not a loss) and TRL's f-divergence variants.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.errors import UserError, problem
from posttrain.registry import Registry, keyword_parameters

Stats = dict[str, Tensor]
LossResult = tuple[Tensor, Stats]
PreferenceLossFn = Callable[..., LossResult]


@dataclass(frozen=True)
class PreferenceLogps:
    """Sequence log-probabilities of a batch of preference pairs; every field is [B].

    ``policy_*`` carry gradient. ``*_lengths`` count response tokens (float or long).
    ``ref_*`` are None for reference-free losses; losses detach them.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.policy_chosen.shape
        if len(shape) != 1:
            raise ValueError(f"PreferenceLogps fields must be [B]; policy_chosen has shape {tuple(shape)}")
        for name in ("policy_rejected", "chosen_lengths", "rejected_lengths", "ref_chosen", "ref_rejected"):
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise ValueError(f"PreferenceLogps.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if (self.ref_chosen is None) != (self.ref_rejected is None):
            raise ValueError("PreferenceLogps: give both ref_chosen and ref_rejected, or neither")


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered preference loss: the pure function and what a stage must know about it."""

    name: str
    fn: PreferenceLossFn
    needs_reference: bool

    def __call__(self, batch: PreferenceLogps, **params: object) -> LossResult:
        return self.fn(batch, **params)

    @property
    def params(self) -> dict[str, object]:
        """The loss's keyword parameters and their defaults (for config validation)."""
        return keyword_parameters(self.fn)


PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")


def _register(
    name: str, *, needs_reference: bool, aliases: tuple[str, ...] = ()
) -> Callable[[PreferenceLossFn], PreferenceLossFn]:
    def decorate(fn: PreferenceLossFn) -> PreferenceLossFn:
        PREFERENCE_LOSSES.add(name, PreferenceLoss(name, fn, needs_reference), aliases=aliases)
        return fn

    return decorate


def get_preference_loss(name: str, where: str = "") -> PreferenceLoss:
    """The loss registered as ``name`` (or an alias), or user code ``"pkg.module:function"``.

    A user function is assumed to need a reference model unless it has ``needs_reference = False``.
    """
    found = PREFERENCE_LOSSES.get(name, where)
    if isinstance(found, PreferenceLoss):
        return found
    if not callable(found):
        raise UserError(problem(where or "preference loss", f"{name!r} is not callable",
                                "point it at a function fn(batch, **params) -> (losses, stats)"))
    return PreferenceLoss(name, found, bool(getattr(found, "needs_reference", True)))


def needs_reference(names: Sequence[str]) -> bool:
    """Whether any of the named losses needs reference logps (the stage skips loading one if not)."""
    return any(get_preference_loss(name).needs_reference for name in names)


# --------------------------------------------------------------------------------------------
# Shared pieces


def _float(x: Tensor) -> Tensor:
    # Half-precision logps lose the small differences these losses are made of; work in fp32.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _logratios(batch: PreferenceLogps, loss_name: str) -> tuple[Tensor, Tensor]:
    """Policy minus reference logps for chosen and rejected [B]; the reference is detached."""
    if batch.ref_chosen is None or batch.ref_rejected is None:
        raise ValueError(f"preference loss {loss_name!r} needs reference logps (ref_chosen, ref_rejected)")
    chosen = _float(batch.policy_chosen) - _float(batch.ref_chosen).detach()
    rejected = _float(batch.policy_rejected) - _float(batch.ref_rejected).detach()
    return chosen, rejected


def _lengths(batch: PreferenceLogps, like: Tensor) -> tuple[Tensor, Tensor]:
    # Clamped at 1 (as TRL does) so an empty response cannot divide by zero; the data layer is
    # where empty responses are rejected loudly.
    chosen = batch.chosen_lengths.to(like.dtype).clamp(min=1.0)
    rejected = batch.rejected_lengths.to(like.dtype).clamp(min=1.0)
    return chosen, rejected


def _stats(chosen_rewards: Tensor, rejected_rewards: Tensor, **extra: Tensor) -> Stats:
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    stats = {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margin": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
    }
    stats.update({key: value.detach() for key, value in extra.items()})
    return stats


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1-eps) log sigmoid(z) - eps log sigmoid(-z)``: the cDPO form (Mitchell 2023)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def _nll(batch: PreferenceLogps, normaliser: float | Tensor | None) -> Tensor:
    """Per-pair NLL of the chosen response [B].

    ``normaliser=None``: divided by the pair's own chosen length, i.e. the mean per-token NLL
    of that response (RPO eq. 1, OpenRLHF). A number L: divided by L instead; pass the mean
    chosen length over the *global* batch and the caller's ``sum / pairs`` reduction becomes the
    mean over all chosen tokens (TRL's ``sft`` loss type and its CPO/ORPO NLL), which weights long
    responses more.
    """
    policy_chosen = _float(batch.policy_chosen)
    if normaliser is None:
        chosen_lengths, _ = _lengths(batch, policy_chosen)
        return -policy_chosen / chosen_lengths
    if isinstance(normaliser, Tensor):
        normaliser = normaliser.detach()
    return -policy_chosen / normaliser


# --------------------------------------------------------------------------------------------
# Reference-based losses


@_register("dpo", needs_reference=True, aliases=("sigmoid",))
def dpo_loss(batch: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossResult:
    """DPO: ``-log sigmoid(beta * h)``, h = (pi_c - ref_c) - (pi_r - ref_r).

    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7. ``label_smoothing`` eps > 0 is
    conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): labels are
    assumed flipped with probability eps, giving ``-(1-eps) log s(beta h) - eps log s(-beta h)``.
    Deviation from TRL 1.16: TRL's ``sigmoid`` silently ignores ``label_smoothing`` (it only
    reaches ``robust``, ``exo_pair`` and ``aot``); OpenRLHF's ``--label_smoothing`` and
    open-instruct's ``dpo_loss`` apply it as here.
    """
    chosen, rejected = _logratios(batch, "dpo")
    losses = _smoothed_sigmoid_loss(beta * (chosen - rejected), label_smoothing)
    return losses, _stats(beta * chosen, beta * rejected)


@_register("robust_dpo", needs_reference=True, aliases=("robust",))
def robust_dpo_loss(batch: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossResult:
    """Robust DPO: the DPO loss de-biased for labels flipped with probability eps.

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO" (the rDPO loss of Sec. 3):
    ``[(1-eps) L(h) - eps L(-h)] / (1 - 2 eps)`` with ``L(h) = -log sigmoid(beta h)``. Unlike cDPO
    its expectation over noisy labels is unbiased, and it is unbounded below as h grows.
    ``label_smoothing`` is eps (TRL's name); the default 0.1 is the paper's typical value (TRL's
    default 0.0 makes it plain DPO).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_dpo label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    chosen, rejected = _logratios(batch, "robust_dpo")
    logits = beta * (chosen - rejected)
    losses = (
        -(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    ) / (1 - 2 * label_smoothing)
    return losses, _stats(beta * chosen, beta * rejected)


@_register("ipo", needs_reference=True)
def ipo_loss(batch: PreferenceLogps, *, beta: float = 0.1, length_normalize: bool = True) -> LossResult:
    """IPO: ``(h - 1 / (2 beta))^2``, beta being the paper's tau.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17. With ``length_normalize`` (default) each log-ratio is divided by its
    response length before taking h, as TRL does: TRL reports confirming with the IPO authors that
    the paper's results used this form, and it keeps beta meaningful across response lengths
    (summed log-ratios make the squared loss grow with length). ``length_normalize=False`` is
    eq. 17 on summed logps, as OpenRLHF's ``--ipo``.
    """
    chosen, rejected = _logratios(batch, "ipo")
    if length_normalize:
        chosen_lengths, rejected_lengths = _lengths(batch, chosen)
        chosen, rejected = chosen / chosen_lengths, rejected / rejected_lengths
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return losses, _stats(beta * chosen, beta * rejected)


@_register("hinge", needs_reference=True)
def hinge_loss(batch: PreferenceLogps, *, beta: float = 0.1) -> LossResult:
    """Hinge: ``max(0, 1 - beta * h)``.

    ``max(0, 1 - beta h) = beta * max(0, 1/beta - h)``: the SLiC calibration loss (Zhao et al.
    2023, "SLiC-HF", eq. 1: ``max(0, delta - log p_c + log p_r)``) with margin delta = 1/beta,
    taken on reference-normalised log-likelihoods as in RSO's hinge loss (Liu et al. 2023,
    "Statistical Rejection Sampling Improves Preference Optimization"). SLiC's regularisation term
    is not included (``combine_losses`` with ``sft`` adds one).
    """
    chosen, rejected = _logratios(batch, "hinge")
    losses = torch.relu(1 - beta * (chosen - rejected))
    return losses, _stats(beta * chosen, beta * rejected)


@_register("dpo_norm", needs_reference=True, aliases=("sigmoid_norm",))
def dpo_norm_loss(batch: PreferenceLogps, *, beta: float = 0.1) -> LossResult:
    """Length-normalised DPO: DPO eq. 7 with each log-ratio divided by its response length.

    TRL ``sigmoid_norm`` = open-instruct ``dpo_norm`` (Tulu 3's DPO). Because per-token
    log-ratios are ~length times smaller than summed ones, useful betas are much larger than
    DPO's (Tulu 3 used 5). Rewards in the stats are the normalised ones the loss compares
    (TRL logs the unnormalised ``beta * (pi - ref)`` instead).
    """
    chosen, rejected = _logratios(batch, "dpo_norm")
    chosen_lengths, rejected_lengths = _lengths(batch, chosen)
    chosen_rewards = beta * chosen / chosen_lengths
    rejected_rewards = beta * rejected / rejected_lengths
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, _stats(chosen_rewards, rejected_rewards)


@_register("rpo", needs_reference=True)
def rpo_loss(
    batch: PreferenceLogps,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    nll_length_normaliser: float | Tensor | None = None,
) -> LossResult:
    """RPO / DPO+NLL: the DPO loss plus ``alpha`` times the NLL of the chosen response.

    Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 1; the paper uses
    alpha = 1 and divides the NLL by the chosen response's length (the default here, as
    OpenRLHF's ``nll_loss_coef``). ``nll_length_normaliser`` gives TRL's batch token mean instead
    (see ``sft_loss``). ``label_smoothing`` is DPO's cDPO option.
    """
    losses, stats = dpo_loss(batch, beta=beta, label_smoothing=label_smoothing)
    nll = _nll(batch, nll_length_normaliser)
    stats["nll"] = nll.detach()
    return losses + alpha * nll, stats


@_register("apo_zero", needs_reference=True)
def apo_zero_loss(batch: PreferenceLogps, *, beta: float = 0.1) -> LossResult:
    """APO-zero: ``1 - sigmoid(beta r_c) + sigmoid(beta r_r)``, r = pi - ref.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7: raises the chosen
    likelihood and lowers the rejected one, each anchored to the reference (for when the chosen
    answers are better than the model's own).
    """
    chosen, rejected = _logratios(batch, "apo_zero")
    losses = 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    return losses, _stats(beta * chosen, beta * rejected)


@_register("apo_down", needs_reference=True)
def apo_down_loss(batch: PreferenceLogps, *, beta: float = 0.1) -> LossResult:
    """APO-down: ``sigmoid(beta r_c) + 1 - sigmoid(beta (r_c - r_r))``.

    D'Oosterlinck et al. 2024, eq. 8: lowers both likelihoods, the rejected one more (for when the
    chosen answers are worse than the model's own). Raising the chosen logp does not always lower
    this loss, by design.
    """
    chosen, rejected = _logratios(batch, "apo_down")
    losses = torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))
    return losses, _stats(beta * chosen, beta * rejected)


@_register("exo_pair", needs_reference=True)
def exo_pair_loss(batch: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossResult:
    """EXO (pairwise): ``KL(q || p)`` with q = softmax of beta-scaled log-ratios over {c, r}
    and p = (1 - eps, eps).

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16
    with K = 2. ``label_smoothing`` is eps, which must be in (0, 1); the paper suggests 1e-3.
    The loss is minimised at ``sigmoid(beta h) = 1 - eps``, not at h -> infinity.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair label_smoothing must lie in (0, 1), got {label_smoothing}")
    chosen, rejected = _logratios(batch, "exo_pair")
    logits = beta * (chosen - rejected)
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = log_q_chosen.exp() * (log_q_chosen - math.log1p(-label_smoothing)) + log_q_rejected.exp() * (
        log_q_rejected - math.log(label_smoothing)
    )
    return losses, _stats(beta * chosen, beta * rejected)


@_register("nca_pair", needs_reference=True)
def nca_pair_loss(batch: PreferenceLogps, *, beta: float = 0.1) -> LossResult:
    """NCA (pairwise): ``-log s(beta r_c) - 0.5 log s(-beta r_c) - 0.5 log s(-beta r_r)``.

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
    (NCA with K = 2 and binary preference rewards). It scores each response's absolute log-ratio,
    so the chosen logp's effect changes sign at ``beta r_c = log 2``.
    """
    chosen, rejected = _logratios(batch, "nca_pair")
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    losses = (
        -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
    )
    return losses, _stats(chosen_rewards, rejected_rewards)


@_register("bco_pair", needs_reference=True)
def bco_pair_loss(batch: PreferenceLogps, *, beta: float = 0.1, reward_shift: float | Tensor = 0.0) -> LossResult:
    """BCO (pairwise): ``-log s(beta r_c - delta) - log s(-(beta r_r - delta))``.

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment": the
    rewards are logits of a binary classifier, shifted by delta, the running mean of the rewards.
    That mean is state, so it is an explicit argument here: keep a ``RunningMean``, update it with
    ``implicit_rewards(batch, beta=beta)`` each step and pass ``reward_shift=state.mean``.
    TRL 1.16's ``bco_pair`` drops the shift (delta = 0, the default here); earlier TRL versions
    kept a running mean (``RunningMoments``) inside the trainer.
    """
    chosen, rejected = _logratios(batch, "bco_pair")
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    shift = reward_shift.detach() if isinstance(reward_shift, Tensor) else reward_shift
    losses = -F.logsigmoid(chosen_rewards - shift) - F.logsigmoid(-(rejected_rewards - shift))
    return losses, _stats(chosen_rewards, rejected_rewards)


@_register("sppo_hard", needs_reference=True)
def sppo_hard_loss(batch: PreferenceLogps, *, beta: float = 0.1) -> LossResult:
    """SPPO with hard labels: ``(r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2``.

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", eq. 4.7
    with the win probability set to 1 for the chosen and 0 for the rejected response (TRL's
    ``sppo_hard``; the paper's soft version needs PairRM probabilities). Squared targets: raising
    the chosen logp past its target raises the loss.
    """
    chosen, rejected = _logratios(batch, "sppo_hard")
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return losses, _stats(beta * chosen, beta * rejected)


@_register("discopop", needs_reference=True)
def discopop_loss(batch: PreferenceLogps, *, beta: float = 0.1, tau: float = 0.05) -> LossResult:
    """DiscoPOP (log-ratio modulated loss): ``(1 - s(rho/tau)) * -log s(rho) + s(rho/tau) * exp(-rho)``,
    rho = beta * h.

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models", eq. 5; tau = 0.05 as recommended. The exponential branch is computed as
    ``exp(-rho + log s(rho/tau))``: TRL computes ``exp(-rho) * s(rho/tau)``, which is inf * 0 = NaN
    once rho < about -88 in fp32. The loss is not monotone in rho near 0 (the paper notes it is
    non-convex).
    """
    chosen, rejected = _logratios(batch, "discopop")
    logits = beta * (chosen - rejected)
    logistic = -F.logsigmoid(logits) * torch.sigmoid(-logits / tau)
    exponential = torch.exp(-logits + F.logsigmoid(logits / tau))
    return logistic + exponential, _stats(beta * chosen, beta * rejected)


# --------------------------------------------------------------------------------------------
# Reference-free losses (reference logps are ignored when given)


@_register("simpo", needs_reference=False)
def simpo_loss(
    batch: PreferenceLogps, *, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0
) -> LossResult:
    """SimPO: ``-log sigmoid(beta/|y_c| log pi(y_c) - beta/|y_r| log pi(y_r) - gamma)``.

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6. Defaults sit in the range the paper tunes over (beta about 2, gamma/beta about 0.5;
    TRL's CPOConfig defaults beta = 0.1, simpo_gamma = 0.5 are far from it); open-instruct's
    ``gamma_beta_ratio`` r is ``gamma = r * beta``. ``label_smoothing`` is the cDPO-style option
    the SimPO code and TRL's CPOTrainer expose (0 = the paper).
    """
    policy_chosen, policy_rejected = _float(batch.policy_chosen), _float(batch.policy_rejected)
    chosen_lengths, rejected_lengths = _lengths(batch, policy_chosen)
    chosen_rewards = beta * policy_chosen / chosen_lengths
    rejected_rewards = beta * policy_rejected / rejected_lengths
    losses = _smoothed_sigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return losses, _stats(chosen_rewards, rejected_rewards)


@_register("cpo", needs_reference=False)
def cpo_loss(
    batch: PreferenceLogps,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    nll_length_normaliser: float | Tensor | None = None,
) -> LossResult:
    """CPO: ``-log sigmoid(beta (log pi(y_c) - log pi(y_r))) + alpha * NLL(y_c)``.

    Xu et al. 2024, "Contrastive Preference Optimization", eq. 3 (L_prefer, DPO with a uniform
    reference) plus the NLL term L_NLL. Our NLL defaults to the per-sequence token mean; TRL's
    CPOTrainer takes the token mean over the whole batch (pass ``nll_length_normaliser``, see
    ``sft_loss``). TRL's AlphaPO reward transform (``alpha`` in CPOConfig) is not implemented.
    """
    policy_chosen, policy_rejected = _float(batch.policy_chosen), _float(batch.policy_rejected)
    losses = _smoothed_sigmoid_loss(beta * (policy_chosen - policy_rejected), label_smoothing)
    nll = _nll(batch, nll_length_normaliser)
    return losses + alpha * nll, _stats(beta * policy_chosen, beta * policy_rejected, nll=nll)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate on both sides of -log 2 (Maechler 2012).

    Each branch only sees inputs from its own side, so the branch ``where`` discards cannot put
    an inf into the gradient (0 * inf = NaN) when x is within float eps of 0.
    """
    pivot = torch.full_like(x, -math.log(2))
    far = x < pivot
    far_branch = torch.log1p(-torch.exp(torch.where(far, x, pivot)))
    near_branch = torch.log(-torch.expm1(torch.where(far, pivot, x)))
    return torch.where(far, far_branch, near_branch)


@_register("orpo", needs_reference=False)
def orpo_loss(
    batch: PreferenceLogps,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    nll_length_normaliser: float | Tensor | None = None,
) -> LossResult:
    """ORPO: ``NLL(y_c) - beta * log sigmoid(log odds(y_c) - log odds(y_r))``.

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    eqs. 4, 6 and 7: odds(y) = p / (1 - p) with p = exp(mean token logp), and beta is the paper's
    lambda. Deviation from TRL's ORPOTrainer (and the authors' code by default): their NLL also
    covers the *prompt* tokens, token-averaged over the batch; ours covers the chosen response only
    (``PreferenceLogps`` has no prompt logps, and posttrain never trains on prompts by default),
    averaged per sequence unless ``nll_length_normaliser`` is given. ``nll_weight`` scales the NLL
    (1 = the paper). A mean logp of exactly 0 (p = 1, infinite odds) is nudged to the largest value
    below 0 so the loss stays finite.
    """
    policy_chosen, policy_rejected = _float(batch.policy_chosen), _float(batch.policy_rejected)
    chosen_lengths, rejected_lengths = _lengths(batch, policy_chosen)
    just_below_zero = -torch.finfo(policy_chosen.dtype).tiny
    mean_chosen = (policy_chosen / chosen_lengths).clamp(max=just_below_zero)
    mean_rejected = (policy_rejected / rejected_lengths).clamp(max=just_below_zero)
    log_odds_ratio = (mean_chosen - mean_rejected) - (_log1mexp(mean_chosen) - _log1mexp(mean_rejected))
    nll = _nll(batch, nll_length_normaliser)
    losses = nll_weight * nll - beta * F.logsigmoid(log_odds_ratio)
    # Rewards as TRL logs them: beta times the mean token logp.
    return losses, _stats(beta * mean_chosen, beta * mean_rejected, nll=nll, log_odds_ratio=log_odds_ratio)


@_register("sft", needs_reference=False)
def sft_loss(batch: PreferenceLogps, *, nll_length_normaliser: float | Tensor | None = None) -> LossResult:
    """NLL of the chosen response, as a preference-loss term (TRL ``sft``; RPO/MPO ingredient).

    Per pair: ``-log pi(y_c) / |y_c|`` by default (per-sequence token mean), or
    ``-log pi(y_c) / L`` with ``nll_length_normaliser=L``. TRL's ``sft`` is the token mean over all
    chosen tokens of the micro-batch; to match it pass L = the mean chosen length over the global
    batch, so that ``sum / pairs`` over the global batch equals ``sum of token NLLs / tokens``.
    Stats: the rewards are the mean token logps of each response (no beta, no reference).
    """
    policy_chosen, policy_rejected = _float(batch.policy_chosen), _float(batch.policy_rejected)
    chosen_lengths, rejected_lengths = _lengths(batch, policy_chosen)
    nll = _nll(batch, nll_length_normaliser)
    return nll, _stats(policy_chosen / chosen_lengths, policy_rejected / rejected_lengths, nll=nll)


# --------------------------------------------------------------------------------------------
# State helpers and combinations


@dataclass(frozen=True)
class RunningMean:
    """A count-weighted running mean, the explicit state behind BCO's reward shift."""

    mean: float | Tensor = 0.0
    count: int = 0

    def update(self, values: Tensor) -> RunningMean:
        """A new state including ``values`` (detached). Under several processes pass the
        values gathered from all of them so every process holds the same state."""
        values = values.detach()
        total = self.count + values.numel()
        if total == 0:
            return self
        return RunningMean((self.mean * self.count + values.sum()) / total, total)


def implicit_rewards(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """``beta * (pi - ref)`` for the chosen then the rejected responses [2B], detached."""
    chosen, rejected = _logratios(batch, "implicit_rewards")
    return (beta * torch.cat([chosen, rejected])).detach()


def combine_losses(
    batch: PreferenceLogps, specs: Sequence[tuple[str, float, Mapping[str, object]]]
) -> LossResult:
    """A weighted sum of named losses: ``sum_i weight_i * loss_i`` per pair [B].

    Matches TRL 1.16's ``loss_type=[...]`` with ``loss_weights=[...]`` (there the loss is
    ``sum_i w_i * mean(loss_i)``, the same number once the caller takes the mean; TRL shares one
    beta across the list, here each loss gets its own params, so pass the same beta to match).
    Stats are prefixed with the loss's registered name (``"dpo/margin"``, ``"sft/nll"``), plus
    ``"<name>/loss"``, its unweighted per-pair loss; a name used twice gets ``_1``, ``_2``, ...
    """
    if not specs:
        raise ValueError("combine_losses needs at least one (name, weight, params) spec")
    total: Tensor | None = None
    stats: Stats = {}
    seen: dict[str, int] = {}
    for name, weight, params in specs:
        loss = get_preference_loss(name)
        losses, loss_stats = loss(batch, **dict(params))
        count = seen.get(loss.name, 0)
        seen[loss.name] = count + 1
        prefix = loss.name if count == 0 else f"{loss.name}_{count}"
        stats[f"{prefix}/loss"] = losses.detach()
        stats.update({f"{prefix}/{key}": value for key, value in loss_stats.items()})
        total = weight * losses if total is None else total + weight * losses
    assert total is not None
    return total, stats
