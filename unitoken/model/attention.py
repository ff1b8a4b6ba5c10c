"""Variable-length causal attention over packed rows: no padding, no attention across samples.

Packing puts several samples in one row with ``position_ids`` restarting at 0 per sample. Stock
SDPA then needs a dense block-diagonal [b, 1, T, T] mask, so every row pays the full T x T
attention and the masked kernel. Here the rows are flattened to [b*T, h, d] and each sample
attends only to itself: ``torch.nn.attention.varlen.varlen_attn`` (Flash Attention inside
torch) on CUDA, a per-sample SDPA loop elsewhere (the CPU reference the tests compare with).

Registered with transformers as the attention implementation ``"unitoken_varlen"``; since that
name has no mask function, transformers builds no mask at all for it. The sample boundaries
travel to every layer as ``cu_seq_lens_q``/``max_length_q`` keyword arguments, the names
transformers' own flash-attention path uses.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

VARLEN = "unitoken_varlen"
# "auto": varlen_attn on CUDA when torch has it, else the per-sample loop; "loop" forces the loop
# (the benchmarks compare both).
BACKEND = "auto"

try:  # torch >= 2.10 on CUDA
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - older torch
    _varlen_attn, _VARLEN_PARAMS = None, set()


def varlen_metadata(position_ids: torch.Tensor) -> dict:
    """Sample boundaries of packed rows, from positions that restart at 0 per sample.

    Args:
        position_ids: [b, T]; every row starts a sample at position 0.

    Returns:
        {"cu_seq_lens_q": int32 [n+1] offsets into the flattened b*T tokens,
         "max_length_q": int, the longest sample}, with the same values under the ``_k`` names.
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).squeeze(1)
    total = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    bounds = cu.tolist()  # one host sync per forward, not one per layer
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    meta = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    if not (flat.is_cuda and _varlen_attn is not None and BACKEND == "auto"):
        # the per-sample loop's spans, as Python ints; not passed to the CUDA kernel: a compiled
        # layer would guard on the list and recompile for every micro-batch's sample count
        meta["seq_bounds"] = bounds
    return meta


def _per_sample_sdpa(q, k, v, bounds, scale):
    """q, k, v: [N, h, d] -> [N, h, d]; causal attention within each [bounds[i], bounds[i+1]) span."""
    out = torch.empty_like(q)
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [h, n, d]
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens_q=None, max_length_q=None,
                             seq_bounds=None, **kwargs):
    """transformers attention interface: query/key/value [b, h, T, d] -> ([b, T, h, d], None).

    Raises:
        ValueError: no sample boundaries were passed, or attention dropout was asked for (the
            varlen kernel has none; set train.dropout=0 or use train.attention=sdpa).
    """
    if cu_seq_lens_q is None:
        raise ValueError("varlen attention needs cu_seq_lens_q/max_length_q (packed rows); "
                         "call UniToken.hidden_states with position_ids")
    if dropout:
        raise ValueError(f"varlen attention has no attention dropout (got {dropout}); "
                         "set train.dropout=0 or train.attention=sdpa")
    b, h, t, d = query.shape
    if key.shape[1] != h:  # grouped-query attention: repeat kv heads
        key = key.repeat_interleave(h // key.shape[1], dim=1)
        value = value.repeat_interleave(h // value.shape[1], dim=1)
    q, k, v = (x.transpose(1, 2).reshape(b * t, h, d) for x in (query, key, value))
    if _varlen_attn is not None and q.is_cuda and BACKEND == "auto":
        extra = {"is_causal": True} if "is_causal" in _VARLEN_PARAMS else {"window_size": (-1, 0)}
        if "scale" in _VARLEN_PARAMS:
            extra["scale"] = scaling
        out = _varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **extra)
    else:
        out = _per_sample_sdpa(q, k, v, seq_bounds if seq_bounds is not None else cu_seq_lens_q.tolist(), scaling)
    return out.view(b, t, h, d), None


AttentionInterface.register(VARLEN, varlen_attention_forward)
