"""Cross-entropy (+ z-loss) straight from hidden states, one chunk of rows at a time.

With a 65,536-entry vocabulary, 8k supervised tokens give [8k, 65,536] logits: 1 GiB in bf16
and 2 GiB more once upcast to fp32, plus the same again for their gradient. This computes the
loss and both gradients (hidden and head weight) chunk by chunk inside the forward pass, like
Liger's fused linear cross-entropy: at most ``chunk`` rows of fp32 logits exist at a time, and
the matrix work stays the usual three products (logits, grad hidden, grad weight). The
backward pass only scales the stored gradients by the incoming one.
"""

from __future__ import annotations

import torch


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, z_weight: float, chunk: int, num_tokens: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk):
            h = hidden[a:a + chunk]
            t = targets[a:a + chunk]
            w = token_weights[a:a + chunk]
            logits = (h @ weight.t()).float()  # [c, V] fp32: the only large buffer
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(t.numel(), device=t.device)
            ce += ((lse - logits[rows, t]) * w).sum()
            z += (lse * lse).sum()
            if need_h or need_w:
                # d loss / d logits = w * (softmax - onehot) + z_weight * 2 * lse * softmax / num_tokens
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs.mul_((w + (2.0 * z_weight / num_tokens) * lse).unsqueeze(1))
                probs[rows, t] -= w
                dlogits = probs.to(hidden.dtype)
                if need_h:
                    grad_h[a:a + chunk] = dlogits @ weight
                if need_w:
                    grad_w += (dlogits.t() @ h).float()
        z = z / num_tokens
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        ctx.mark_non_differentiable(ce, z)
        return ce + z_weight * z, ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          token_weights: torch.Tensor | None = None, z_loss_weight: float = 0.0,
                          chunk: int = 4096, num_tokens: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of a linear head + softmax cross-entropy, never building all logits at once.

    Args:
        hidden: [n, d] hidden states of the supervised positions only.
        weight: [V, d] head weight (``lm_head.weight``).
        targets: [n] target ids.
        token_weights: [n] weight of each token's cross-entropy; None = 1 / num_tokens each.
        z_loss_weight: weight of sum(logsumexp(logits)^2) / num_tokens (PaLM's z-loss).
        chunk: rows per chunk; memory is chunk x V fp32.
        num_tokens: what the mean cross-entropy and the z-loss divide by; None = n. Data-parallel
            ranks pass the supervised tokens of all ranks, so that their losses sum to the
            global batch's.

    Returns:
        (loss, ce, z): loss = ce + z_loss_weight * z, differentiable in hidden and weight;
        ce and z are detached.
    """
    n = hidden.shape[0] if num_tokens is None else int(num_tokens)
    if token_weights is None:
        token_weights = torch.full((hidden.shape[0],), 1.0 / n, device=hidden.device)
    return _FusedLinearCE.apply(hidden, weight, targets, token_weights.float(), float(z_loss_weight), int(chunk), n)
