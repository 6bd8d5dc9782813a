"""PPO's critic as a part the online loop is handed: it turns a step's outcome rewards into GAE
advantages and returns, and trains a value model next to the policy.

The online loop calls it at three points of a step: ``set_advantages`` (after the old/reference
logprob passes, before any update), ``backward`` (per micro-batch, after the policy's) and
``step`` (per optimizer step). Its weights, optimizer and scheduler go into the loop's checkpoints,
so a resumed run continues exactly. The critic has its own optimizer (a separate model, as in
TRL/OpenRLHF/verl), so PPO's vf_coef is folded into its learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from posttrain.config.components import OptimConfig
from posttrain.loops.distributed import DistInfo, allreduce_gradients, allreduce_sum
from posttrain.loops.offline import autocast, build_optimizer, build_scheduler, warmup_steps
from posttrain.loops.rl_batch import RolloutBatch, pack_shared_prompts, per_micro_batch
from posttrain.loops.state import trainable_state
from posttrain.losses.advantages import gae, outcome_token_rewards, whiten
from posttrain.losses.aggregation import GlobalNormalisers, aggregate
from posttrain.losses.kl import kl_penalty_in_reward
from posttrain.losses.rl_filters import groups_with_signal
from posttrain.losses.value import explained_variance, value_loss, value_moments
from posttrain.models.heads import RewardModel


@dataclass
class CriticSettings:
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float | None = 0.2
    warmup_steps: int = 0  # rollout steps that update only the critic
    micro_batch_size: int = 8
    share_prompt: bool = False  # value passes on shared-prompt packed rows (rl_batch.SharedPromptPack)


class Critic:
    """A value model with its optimizer; ``updates`` = its optimizer steps over the whole run."""

    def __init__(self, model: RewardModel, optim: OptimConfig, settings: CriticSettings, updates: int,
                 info: DistInfo) -> None:
        self.model, self.optim, self.settings, self.info = model.to(info.device).train(), optim, settings, info
        self.optimizer = build_optimizer(model, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, warmup_steps(optim, updates), updates)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _values(self, mb: RolloutBatch) -> torch.Tensor:
        """V at the state before each target-space token [r, l]: the hidden state at position t
        has read tokens <= t and predicts token t + 1."""
        with autocast(self.optim, self.info.device):
            if not self.settings.share_prompt:
                return self.model.values(mb.input_ids, mb.position_ids)[:, :-1].float()
            pack = pack_shared_prompts(mb)
            values = self.model.scores_at(pack.input_ids, pack.position_ids, torch.zeros_like(pack.reads),
                                          pack.reads, pack.blocks)[:, 0]
        # 0 off the completion tokens, which no value loss or advantage reads
        return torch.zeros(mb.completion.shape, dtype=values.dtype, device=values.device).masked_scatter(
            mb.completion, values)

    def set_advantages(self, batch: RolloutBatch, rewards: torch.Tensor, valid: torch.Tensor, beta: float,
                       kl_estimator: str, kl_in_reward: bool) -> dict[str, float]:
        """Old values, token rewards (the outcome on the last token, minus beta KL per token when
        the KL is in the reward), GAE advantages (whitened over the global batch) and returns.
        ``rewards``/``valid`` [P, G] are the global outcome rewards (for the health stat)."""
        self.model.eval()
        batch.old_values = per_micro_batch(batch, self.settings.micro_batch_size,
                                           lambda mb: torch.where(mb.completion, self._values(mb), 0.0))
        self.model.train()
        token_rewards = outcome_token_rewards(batch.rewards.to(batch.mask.dtype), batch.mask)
        stats: dict[str, float] = {}
        sums: dict[str, float] = {}
        if kl_in_reward and batch.ref_logp is not None and beta > 0:
            token_rewards, kl = kl_penalty_in_reward(token_rewards, batch.old_logp, batch.ref_logp, batch.mask, beta,
                                                     kl_estimator)
            sums["kl"] = float(kl["kl"]) * float(batch.mask.sum())
        advantages, returns = gae(token_rewards, batch.old_values, batch.mask, self.settings.gamma, self.settings.lam)
        batch.advantages = self._whiten(advantages, batch.mask)
        batch.returns = returns
        moments = allreduce_sum({**value_moments(batch.old_values, returns, batch.mask), **sums}, self.info)
        stats["explained_variance"] = explained_variance(moments)
        stats["returns_mean"] = moments["returns"] / max(moments["tokens"], 1.0)
        if "kl" in moments:
            stats["kl"] = moments["kl"] / max(moments["tokens"], 1.0)
        # The critic is the baseline, so only a batch whose rewards are all equal carries no signal.
        stats["zero_variance_share"] = 1 - float(groups_with_signal(rewards.reshape(1, -1), valid.reshape(1, -1)).all())
        return stats

    def _whiten(self, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``masked_whiten`` with the mean and (Bessel) variance of every process's tokens."""
        x, w = advantages.to(torch.float64), mask.to(torch.float64)
        first = allreduce_sum({"n": float(w.sum()), "sum": float((x * w).sum())}, self.info)
        mean = first["sum"] / max(first["n"], 1.0)
        second = allreduce_sum({"sq": float(((x - mean).pow(2) * w).sum())}, self.info)
        return whiten(x, mask, mean, second["sq"] / max(first["n"] - 1, 1.0)).to(advantages.dtype)

    def backward(self, mb: RolloutBatch, norm: GlobalNormalisers, aggregation: str) -> dict[str, float]:
        """The clipped value loss of one micro-batch, aggregated like the policy loss; backward."""
        per_token, stats = value_loss(self._values(mb), mb.old_values, mb.returns, mb.mask, self.settings.value_clip)
        loss = aggregate(per_token, mb.mask, norm, aggregation)
        loss.backward()
        return {**{k: float(v) for k, v in stats.items()}, "value_loss": float(loss.detach())}

    def step(self) -> dict[str, float]:
        allreduce_gradients(self.params, self.info)
        out = {}
        if self.optim.max_grad_norm is not None:
            out["critic_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out["critic_lr"] = self.scheduler.get_last_lr()[0]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"model": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
