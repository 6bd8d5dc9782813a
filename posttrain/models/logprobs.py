"""Token log-probabilities without materialising fp32 [N, V] logits at once.

The vocabulary projection and the softmax are computed in chunks of ``chunk`` tokens, in fp32,
reusing one workspace tile. Only positions that are targets are projected at all (prompt and
padding tokens need no logits), which is where most of the speed over a plain
``model(...).logits`` comes from.

Two autograd functions:
- ``weighted_nll``: sum_t w_t * -log p(y_t). The loss is linear in the log-probs, so the gradient
  is known in the forward pass; it is computed there, chunk by chunk, and the backward pass only
  scales it (the fused linear + cross-entropy trick).
- ``token_logprobs``: log p(y_t) per token, for losses that are non-linear in them (DPO, RL). The
  backward recomputes each chunk's softmax instead of storing it.
"""

from __future__ import annotations

import threading

import torch

_workspace = threading.local()
TILE_BYTES = 256 * 1024 * 1024  # cap of the fp32 logits tile; large vocabularies get fewer rows


def chunk_rows(chunk: int, vocab: int) -> int:
    return max(16, min(chunk, TILE_BYTES // (4 * vocab)))


def _tile(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A reusable fp32 [rows, vocab] buffer (fresh large allocations cost page faults on CPU)."""
    key = (rows, vocab, str(device))
    cached = getattr(_workspace, "tiles", None)
    if cached is None:
        cached = _workspace.tiles = {}
    tile = cached.get(key)
    if tile is None:
        cached.clear()  # keep at most one tile alive
        tile = cached[key] = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    return tile


def _logits_into(tile: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = tile[: hidden.shape[0]]
    torch.matmul(hidden.float(), weight.float().t(), out=out)
    return out


def _softmax_inplace(logits: torch.Tensor) -> torch.Tensor:
    """Turn logits [n, V] into probabilities in place; return log-sum-exp [n]."""
    top = logits.amax(dim=-1, keepdim=True)
    logits.sub_(top).exp_()
    total = logits.sum(dim=-1, keepdim=True)
    logits.div_(total)
    return (top + total.log()).squeeze(-1)


class _WeightedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk, temperature):  # noqa: D102
        n, vocab = hidden.shape[0], weight.shape[0]
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        chunk = chunk_rows(chunk, vocab)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        tile = _tile(chunk, vocab, hidden.device)
        w_fp32 = weight.float()
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk].float()
            y = targets[start : start + chunk]
            tw = token_weights[start : start + chunk].float()
            logits = _logits_into(tile, h, w_fp32)
            if temperature != 1.0:
                logits.div_(temperature)
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            lse = _softmax_inplace(logits)
            total += (tw * (lse - target_logit)).sum()
            if needs_grad:
                # d/dlogits of w * (lse - logit_y) = w * (softmax - onehot(y)), then the 1/T.
                probs = logits
                probs.mul_(tw[:, None] / temperature)
                probs.scatter_add_(1, y[:, None], (-tw / temperature)[:, None])
                if grad_hidden is not None:
                    torch.matmul(probs, w_fp32, out=grad_hidden[start : start + chunk])
                if grad_weight is not None:
                    grad_weight.addmm_(probs.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = (grad_hidden * grad_out).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def weighted_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 token_weights: torch.Tensor, *, chunk: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """sum_t token_weights[t] * -log softmax(hidden[t] @ weight.T / temperature)[targets[t]].

    hidden [N, H], weight [V, H], targets [N], token_weights [N] -> scalar (fp32).
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
    return _WeightedNLL.apply(hidden, weight, targets, token_weights, chunk, temperature)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, temperature):  # noqa: D102
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = chunk_rows(chunk, vocab)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        tile = _tile(chunk, vocab, hidden.device)
        w_fp32 = weight.float()
        for start in range(0, n, chunk):
            logits = _logits_into(tile, hidden[start : start + chunk], w_fp32)
            if temperature != 1.0:
                logits.div_(temperature)
            y = targets[start : start + chunk]
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            out[start : start + chunk] = target_logit - _softmax_inplace(logits)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.temperature = chunk, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        hidden, weight, targets = ctx.saved_tensors
        chunk, temperature = ctx.chunk, ctx.temperature
        w_fp32 = weight.float()
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        tile = _tile(chunk, weight.shape[0], hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].float()
            y = targets[start : start + chunk]
            g = grad_out[start : start + chunk].float()
            probs = _logits_into(tile, h, w_fp32)
            if temperature != 1.0:
                probs.div_(temperature)
            _softmax_inplace(probs)
            # d logp_y / d logits = onehot(y) - softmax; chain with g and the 1/T.
            probs.mul_((-g / temperature)[:, None])
            probs.scatter_add_(1, y[:, None], (g / temperature)[:, None])
            if grad_hidden is not None:
                torch.matmul(probs, w_fp32, out=grad_hidden[start : start + chunk])
            if grad_weight is not None:
                grad_weight.addmm_(probs.t(), h)
        gh = grad_hidden.to(hidden.dtype) if grad_hidden is not None else None
        gw = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   chunk: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[targets] per token: [N, H], [V, H], [N] -> [N]."""
    if hidden.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=hidden.device) + (hidden.sum() + weight.sum()) * 0.0
    return _TokenLogprobs.apply(hidden, weight, targets, chunk, temperature)


@torch.no_grad()
def token_entropy(hidden: torch.Tensor, weight: torch.Tensor, *, chunk: int = 1024,
                  temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the next-token distribution at each position [N] (no gradient; a metric)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_rows(chunk, vocab)
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    w_fp32 = weight.float()
    for start in range(0, n, chunk):
        logits = hidden[start : start + chunk].float() @ w_fp32.t()
        if temperature != 1.0:
            logits.div_(temperature)
        logp = torch.log_softmax(logits, dim=-1)
        out[start : start + chunk] = -(logp.exp() * logp).sum(-1)
    return out
