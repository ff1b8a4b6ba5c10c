"""Memory planning: how a rank's share of the global batch is cut into micro-batches, and how
many decoder layers recompute their activations, from the memory the card has left.

The global batch is the science (``StageConfig.batch_size`` samples per optimizer step); how it
is cut is the engineering. ``train.micro_batch_tokens: auto`` measures the card's free memory
once the model, optimizer and ZeRO state are placed, subtracts what is placed later (gradients)
and a safety margin, and picks from the activation model below the largest micro-batch that fits
with as few checkpointed layers as keep it efficient. Gradient accumulation then carries the
micro-batches to the global batch (``unitoken.train.batching``), and the loss stays normalised by
the whole step's counts, so the step is the same step whatever the cut.

    plan = plan_memory(ActivationModel.for_stage(recipe, stage), budget_bytes=20 * 2**30,
                       max_tokens=128 * 4096, min_tokens=4096)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

# Activation bytes one decoder layer keeps per token and hidden unit in bf16 without
# checkpointing: 'ours' minus 'ours-ckpt-half' (4 of 8 layers) = 12.7 GiB for a 16,248-token
# micro-batch at hidden 4096 / MLP 11,008 (docs/performance.md). A checkpointed layer keeps only
# its input (2 bytes).
ACT_BYTES_PER_TOKEN_HIDDEN = 53
CKPT_BYTES_PER_TOKEN_HIDDEN = 2
# Per token outside the decoder layers: the embedding output, the final norm's input and output,
# the supervised rows' hidden states and their gradient (bf16), a few hidden widths in all.
EDGE_BYTES_PER_TOKEN_HIDDEN = 12
# Below this many tokens a micro-batch leaves the 7B shape's matrix products short of the card's
# rate; above it, checkpointing a layer (a recomputed forward: ~1/3 of its time) costs more than
# a smaller micro-batch does (docs/performance.md, 16k vs 32k rows: within 3 %).
MIN_EFFICIENT_TOKENS = 8192
GIB = 2**30


class MemoryPlanError(ValueError):
    """Not even one sample of ``max_seq_len`` fits the memory left for activations."""


@dataclass(frozen=True)
class ActivationModel:
    """Bytes of activations a micro-batch keeps for backward, as a function of its tokens and of
    the decoder layers that recompute theirs (``bytes``)."""

    num_layers: int
    hidden: int
    vocab: int
    ce_chunk: int  # 0: one pass over every supervised row (fp32 logits of all of them)
    head_trains: bool  # the chunked loss holds an fp32 [vocab, hidden] gradient of the head
    vision_layers: int  # 0 when the vision tower is frozen or absent (no activations kept)
    vision_hidden: int
    continuous_share: float  # worst-case share of a sample's tokens that went through the vision tower

    @classmethod
    def for_stage(cls, recipe, stage) -> ActivationModel:
        """The model of ``recipe`` training ``stage`` (a ``StageConfig``)."""
        from unitoken.model.sequence import min_seq_len
        from unitoken.model.vision import max_continuous_features

        cfg = recipe.model
        vision_trains = cfg.encoder_mode != "discrete" and "vision" in stage.trainable
        # the vision tower sees about one patch per continuous feature (AnyRes: per tile)
        continuous = max_continuous_features(cfg.vision) if cfg.encoder_mode != "discrete" else 0
        share = min(1.0, continuous / min_seq_len(cfg))
        return cls(num_layers=cfg.llm.num_layers, hidden=cfg.llm.hidden_size, vocab=cfg.llm.vocab_size,
                   ce_chunk=recipe.train.ce_chunk, head_trains="lm_head" in stage.trainable,
                   vision_layers=cfg.vision.num_layers if vision_trains else 0,
                   vision_hidden=cfg.vision.hidden_size, continuous_share=share)

    def per_token(self, checkpoint_layers: int) -> float:
        n = min(max(checkpoint_layers, 0), self.num_layers)
        llm = ((self.num_layers - n) * ACT_BYTES_PER_TOKEN_HIDDEN + n * CKPT_BYTES_PER_TOKEN_HIDDEN
               + EDGE_BYTES_PER_TOKEN_HIDDEN) * self.hidden
        vision = self.continuous_share * self.vision_layers * ACT_BYTES_PER_TOKEN_HIDDEN * self.vision_hidden
        unchunked_logits = 0 if self.ce_chunk else 2 * 4 * self.vocab  # fp32 logits + their gradient
        return llm + vision + unchunked_logits

    def fixed(self) -> float:
        """Bytes that do not grow with the micro-batch: the chunked loss's fp32 workspace."""
        chunk = 2 * 4 * self.ce_chunk * self.vocab if self.ce_chunk else 0
        return chunk + (4 * self.vocab * self.hidden if self.head_trains and self.ce_chunk else 0)

    def bytes(self, tokens: int, checkpoint_layers: int) -> float:
        return self.fixed() + tokens * self.per_token(checkpoint_layers)

    def max_tokens(self, budget_bytes: float, checkpoint_layers: int) -> int:
        return max(0, math.floor((budget_bytes - self.fixed()) / self.per_token(checkpoint_layers)))


@dataclass(frozen=True)
class MemoryPlan:
    """What a stage runs with; logged at the start and as MLflow params (``as_params``)."""

    micro_batch_tokens: int
    checkpoint_layers: int
    source: str  # "measured" (free memory of the card), "configured" (activation_budget_gib), "fixed"
    budget_gib: float | None = None  # what activations were allowed to use
    estimate_gib: float | None = None  # the activation model's bytes at this plan
    free_gib: float | None = None  # the card's free memory when measured

    def as_params(self) -> dict:
        return {f"plan.{k}": v for k, v in asdict(self).items() if v is not None}

    def describe(self, num_layers: int) -> str:
        parts = [f"micro-batches of <= {self.micro_batch_tokens:,} tokens",
                 f"activation checkpointing on {self.checkpoint_layers} of {num_layers} layers"]
        if self.budget_gib is not None:
            parts.append(f"{self.estimate_gib:.1f} of {self.budget_gib:.1f} GiB for activations ({self.source}"
                         + (f"; {self.free_gib:.1f} GiB free after the model and optimizer)" if self.free_gib else ")"))
        return ", ".join(parts)


def plan_memory(model: ActivationModel, budget_bytes: float, max_tokens: int, min_tokens: int,
                granularity: int = 1, allow_checkpointing: bool = True, layers: int | None = None,
                source: str = "measured", free_bytes: float | None = None) -> MemoryPlan:
    """The micro-batch and checkpointed layers for an activation budget.

    The fewest checkpointed layers whose largest fitting micro-batch holds at least
    ``max(min_tokens, MIN_EFFICIENT_TOKENS)`` tokens (or the whole share, ``max_tokens``, when that
    is smaller); failing that, every layer checkpointed and the largest micro-batch that fits.

    Args:
        budget_bytes: memory the activations of one micro-batch may use.
        max_tokens: the rank's share of the global batch at most (samples x max_seq_len).
        min_tokens: one sample at most (max_seq_len): a micro-batch must hold any sample.
        granularity: micro-batch tokens are a multiple of this (rows of max_seq_len when packed
            rows have a fixed width).
        allow_checkpointing: False: no layer is checkpointed (only the micro-batch is planned).
        layers: checkpoint exactly this many layers (only the micro-batch is planned).

    Raises:
        MemoryPlanError: not even ``min_tokens`` fit with every layer checkpointed.
    """
    want = min(max_tokens, max(min_tokens, MIN_EFFICIENT_TOKENS))
    candidates = [layers] if layers is not None else range(model.num_layers + 1) if allow_checkpointing else [0]
    best = None
    for n in candidates:
        fits = model.max_tokens(budget_bytes, n) // granularity * granularity
        tokens = min(max_tokens, fits)
        best = (tokens, n)
        if tokens >= want:
            break
    tokens, n = best
    if tokens < min_tokens:
        raise MemoryPlanError(
            f"{budget_bytes / GIB:.1f} GiB left for activations holds {tokens:,} tokens with "
            f"{n} of {model.num_layers} layers checkpointed, fewer than one sample of max_seq_len "
            f"({min_tokens:,}); fix: more GPUs (ZeRO shards the model state), train.zero_stage=3, "
            "train.activation_checkpointing=true, or a shorter max_seq_len")
    return MemoryPlan(micro_batch_tokens=tokens, checkpoint_layers=n, source=source,
                      budget_gib=round(budget_bytes / GIB, 2), estimate_gib=round(model.bytes(tokens, n) / GIB, 2),
                      free_gib=None if free_bytes is None else round(free_bytes / GIB, 2))


def activation_budget(free_bytes: float, total_bytes: float, unplaced_bytes: float) -> float:
    """What activations may use of ``free_bytes``: minus state that is placed only during the
    first step (``unplaced_bytes``: gradients) and a margin for the allocator's fragmentation,
    communication buffers and kernels' workspaces (6 % of the card, at least 3 GiB)."""
    margin = max(3 * GIB, 0.06 * total_bytes)
    return max(0.0, free_bytes - unplaced_bytes - margin)


def measure_free_bytes(device: torch.device) -> tuple[float, float]:
    """(free, total) bytes of the card now: the driver's free memory plus what PyTorch's caching
    allocator holds but does not use."""
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return float(free + cached), float(total)
