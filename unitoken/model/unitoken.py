"""UniToken: a stock transformers Chameleon decoder that reads every image twice.

Modules (their names are the freeze prefixes):
    llm      ChameleonModel (embeddings + decoder + final norm), its VQ encoder removed
    lm_head  Linear(hidden, vocab) over text AND image tokens (never masked: generation needs it)
    vision   SigLIP vision tower (absent in ``discrete`` mode)
    adapter  Linear -> GELU -> Linear into the LLM width (absent in ``discrete`` mode)
    vq       VQ-GAN encoder/decoder, always frozen (not a freeze prefix)

Continuous features are merged like HF's ``get_placeholder_mask``: placeholders are found by
their named token id and a count mismatch raises with both numbers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChameleonConfig, ChameleonModel

from unitoken.config import FREEZE_PREFIXES, ModelConfig
from unitoken.model.attention import VARLEN, varlen_metadata
from unitoken.model.loss import chunked_cross_entropy
from unitoken.model.sequence import IGNORE
from unitoken.model.tokens import SpecialTokens
from unitoken.model.vision import Adapter, arrange_features, build_vision_tower
from unitoken.model.vq import VQTokenizer, hf_vq_config

# transformers 5.24 renamed `past_key_values` to `cache` (5.17 on the GPU machine has the old name).
_CACHE_KWARG = "cache" if "cache" in inspect.signature(ChameleonModel.forward).parameters else "past_key_values"


def chameleon_config(cfg: ModelConfig, vocab: dict[str, int], tokens: SpecialTokens) -> ChameleonConfig:
    llm = cfg.llm
    hf = ChameleonConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
        attention_dropout=llm.attention_dropout,
        swin_norm=llm.swin_norm,
        vocabulary_map=vocab,
        vq_config=hf_vq_config(cfg.vq).to_dict(),
        bos_token_id=tokens.bos,
        eos_token_id=tokens.eos,
        pad_token_id=tokens.pad,
        use_cache=False,  # packing via position_ids is ignored when use_cache=True
    )
    hf._attn_implementation = llm.attn_implementation
    return hf


@dataclass
class ContinuousImages:
    """Inputs of the continuous path for a batch: all tiles, each image's AnyRes grid and size.

    pixel_values: [n_tiles, 3, s, s]; image i owns 1 + rows_i*cols_i consecutive tiles.
    sizes: original (width, height) of image i, which AnyRes needs to cut the padding out of
    its grid features (``vision.feature_crop``); unused for a (0, 0) grid.
    """

    pixel_values: torch.Tensor
    grids: list[tuple[int, int]]
    sizes: list[tuple[int, int]]

    @classmethod
    def concat(cls, items: list[ContinuousImages]) -> ContinuousImages | None:
        items = [x for x in items if x is not None and x.grids]
        if not items:
            return None
        return cls(torch.cat([x.pixel_values for x in items]), [g for x in items for g in x.grids],
                   [z for x in items for z in x.sizes])


class Head(nn.Linear):
    """The output layer; given targets it returns the chunked loss instead of logits. The loss
    goes through this module's own call so that ZeRO-3 gathers the weight for it."""

    def forward(self, hidden, targets=None, token_weights=None, z_loss_weight: float = 0.0, chunk: int = 0,
                num_tokens: int | None = None):
        if targets is None:
            return super().forward(hidden)
        return chunked_cross_entropy(hidden, self.weight, targets, token_weights, z_loss_weight, chunk, num_tokens)


class UniToken(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: dict[str, int]) -> None:
        super().__init__()
        self.config = cfg
        self.vocab = vocab
        self.tokens = SpecialTokens.from_vocab(vocab, cfg.max_grid_tokens)
        if self.tokens.vocab_size > cfg.llm.vocab_size:
            raise ValueError(f"llm.vocab_size={cfg.llm.vocab_size} < tokenizer vocabulary "
                             f"({self.tokens.vocab_size} ids)")
        if self.tokens.num_codes != cfg.vq.num_codes:
            raise ValueError(f"vocabulary has {self.tokens.num_codes} image tokens but "
                             f"vq.num_codes={cfg.vq.num_codes}")
        self.hf_config = chameleon_config(cfg, vocab, self.tokens)
        self.llm = ChameleonModel(self.hf_config)
        del self.llm.vqmodel  # the VQ-GAN lives in self.vq (with its decoder), outside the LLM
        self.lm_head = Head(cfg.llm.hidden_size, cfg.llm.vocab_size, bias=False)
        if cfg.encoder_mode != "discrete":
            self.vision = build_vision_tower(cfg.vision)
            self.adapter = Adapter(cfg.vision.hidden_size, cfg.llm.hidden_size)
        else:
            self.vision = None
            self.adapter = None
        self.vq = VQTokenizer(cfg.vq)
        # Training-speed settings (train.attention / train.ce_chunk), not part of the weights:
        # defaults are the stock paths that inference uses.
        self.attention = "sdpa"
        self.ce_chunk = 0
        self.residual_dropout = 0.0
        self._dropout_hooks: list = []

    # ----------------------------------------------------------------------- speed settings

    def configure_training(self, attention: str = "sdpa", ce_chunk: int = 0, checkpoint_layers: int = 0,
                           compile_layers: bool = False, dropout: float = 0.0) -> None:
        """Training-path settings: residual dropout and the speed settings (docs/performance.md).

        Args:
            attention: "sdpa" (stock; packed rows get a dense block-diagonal mask) or "varlen"
                (packed rows, each sample attends only to itself, no mask is built).
            ce_chunk: rows per chunk of the fused head + cross-entropy; 0 = one pass over all
                supervised rows with fp32 logits.
            checkpoint_layers: recompute the activations of the first n decoder layers in the
                backward pass (-1 = all: the reference's setting); 0 = none.
            compile_layers: torch.compile every decoder layer (in place; fuses the norms, rotary
                and activation around the matrix products).
            dropout: residual dropout (``set_residual_dropout``), set before any compilation.
        """
        if attention not in ("sdpa", "varlen"):
            raise ValueError(f"attention={attention!r}: use sdpa or varlen")
        self.set_residual_dropout(dropout)
        self.attention = attention
        self.ce_chunk = int(ce_chunk)
        self.set_checkpoint_layers(checkpoint_layers)
        if compile_layers:
            for layer in self.llm.layers:
                # The layer's forward only, not its __call__: hooks stay outside the compiled code.
                # DeepSpeed ZeRO-3 gathers and releases parameters in module hooks; compiled into
                # the layer (``layer.compile()``), dynamo re-traced them for every layer and hit
                # its recompile limit in _pre_backward_module_hook (docs/performance.md).
                layer.forward = torch.compile(layer.forward)
            # the SigLIP tower too (its layers run forward and backward on every understanding
            # sample); the number of tiles changes per micro-batch: one dynamic recompile
            for layer in self.vision_layers():
                layer.forward = torch.compile(layer.forward)

    def vision_layers(self) -> list[nn.Module]:
        """The SigLIP tower's encoder layers (none without a tower); found by type, as the
        attribute path differs between transformers releases."""
        if self.vision is None:
            return []
        return [m for m in self.vision.modules() if type(m).__name__.endswith("EncoderLayer")]

    def set_checkpoint_layers(self, checkpoint_layers: int) -> None:
        """Recompute the activations of the first n decoder layers in backward (-1 = all, 0 = none)."""
        layers = self.llm.layers
        n = len(layers) if checkpoint_layers < 0 else min(checkpoint_layers, len(layers))
        if n:  # transformers 5.24 renamed the method; 5.17 (GPU machine) has only the old name
            if hasattr(self.llm, "activation_checkpointing_enable"):
                self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < n

    def set_residual_dropout(self, p: float) -> None:
        """Drop a share ``p`` of every decoder layer's attention and MLP output where it joins the
        residual stream, in train mode only: the reference's layer computes
        ``residual + dropout(attn(x))`` and ``residual + dropout(mlp(x))`` (its ``--dropout
        0.05``). Attention probabilities are not dropped (HF's ``attention_dropout`` stays 0),
        so every attention kernel, the dropout-free varlen one included, serves training.
        """
        if not 0 <= p < 1:
            raise ValueError(f"dropout={p}: must be in [0, 1)")
        self.residual_dropout = float(p)
        if p and not self._dropout_hooks:
            for layer in self.llm.layers:
                # A Swin-norm layer (Chameleon-30B) normalises each branch before the residual
                # add; the reference drops the normalised output there.
                ends = ((layer.input_layernorm, layer.post_attention_layernorm) if self.config.llm.swin_norm
                        else (layer.self_attn.o_proj, layer.mlp.down_proj))
                self._dropout_hooks += [m.register_forward_hook(self._drop_residual) for m in ends]

    def _drop_residual(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, self.residual_dropout, module.training)

    # ----------------------------------------------------------------------- freezing

    def freeze_except(self, trainable: tuple[str, ...] | list[str],
                      freeze_vision_embeddings: bool = False) -> dict[str, int]:
        """Train exactly the modules named by prefix; everything else is frozen.

        Args:
            trainable: module prefixes (``FREEZE_PREFIXES``) that train.
            freeze_vision_embeddings: keep SigLIP's patch and position embeddings frozen even
                when ``vision`` trains (the reference's setting for a pretrained tower).

        Returns:
            parameter counts {"trainable": n, "frozen": m}.

        Raises:
            ValueError: an unknown prefix, or a set that leaves nothing trainable.
        """
        unknown = sorted(set(trainable) - set(FREEZE_PREFIXES))
        if unknown:
            raise ValueError(f"unknown freeze prefixes {unknown}; valid: {list(FREEZE_PREFIXES)}")
        present = {name for name, _ in self.named_children()}
        for name in FREEZE_PREFIXES:
            module = getattr(self, name)
            if module is not None:
                module.requires_grad_(name in trainable)
        if freeze_vision_embeddings and self.vision is not None:
            for suffix in ("embeddings.patch_embedding", "embeddings.position_embedding"):
                # the tower's module path differs across transformers versions; the suffix does not
                found = [m for n, m in self.vision.named_modules() if n == suffix or n.endswith("." + suffix)]
                if len(found) != 1:
                    raise ValueError(f"vision tower has {len(found)} modules named *{suffix}; expected 1")
                found[0].requires_grad_(False)
        self.vq.requires_grad_(False)
        counts = {"trainable": 0, "frozen": 0}
        for _, p in self.named_parameters():
            counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        if counts["trainable"] == 0:
            raise ValueError(f"trainable={list(trainable)} leaves no parameter to train in encoder mode "
                             f"{self.config.encoder_mode!r} (modules present: {sorted(present)})")
        return counts

    # ----------------------------------------------------------------------- embeddings

    def encode_continuous(self, images: ContinuousImages, row_end: torch.Tensor | None = None) -> torch.Tensor:
        """All tiles through SigLIP + adapter -> [n_features, d] in image order.

        Args:
            row_end: [d] the newline token's embedding, which ends every row of AnyRes grid
                features (the reference's end-of-row marker); looked up here when not given.
        """
        if self.vision is None:
            raise ValueError("encoder mode 'discrete' has no continuous path")
        dtype = self.adapter.fc1.weight.dtype
        feats = self.vision(pixel_values=images.pixel_values.to(dtype)).last_hidden_state
        feats = self.adapter(feats)
        if row_end is None and self.config.vision.anyres:
            row_end = self.llm.embed_tokens(torch.tensor([self.tokens.newline], device=feats.device))[0]
        per_image = arrange_features(feats, images.grids, images.sizes, row_end,
                                     self.config.vision.patches_per_side)
        return torch.cat(per_image)

    def embed(self, input_ids: torch.Tensor, images: ContinuousImages | None = None) -> torch.Tensor:
        """input_ids: [b, T] -> inputs_embeds: [b, T, d] with continuous features scattered in.

        Raises:
            ValueError: number of placeholder tokens != number of continuous features.
        """
        row_end = None
        if self.config.vision.anyres and self.vision is not None:
            # The newline embedding (AnyRes end-of-row marker) comes from the same lookup as the
            # ids, so every rank calls the embedding once per forward (ZeRO-3 gathers per call).
            flat = torch.cat([input_ids.reshape(-1), input_ids.new_tensor([self.tokens.newline])])
            table = self.llm.embed_tokens(flat)
            embeds, row_end = table[:-1].view(*input_ids.shape, -1), table[-1]
        else:
            embeds = self.llm.embed_tokens(input_ids)
        mask = input_ids == self.tokens.continuous
        n_tokens = int(mask.sum())
        feats = self.encode_continuous(images, row_end) if images is not None else None
        n_features = 0 if feats is None else feats.shape[0]
        if n_tokens != n_features:
            raise ValueError(f"continuous placeholders and features differ: {n_tokens} tokens vs "
                             f"{n_features} features")
        if n_tokens:
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    # ----------------------------------------------------------------------- forward / loss

    def hidden_states(self, inputs_embeds, attention_mask=None, position_ids=None, cache=None):
        kwargs = {_CACHE_KWARG: cache} if cache is not None else {}
        # varlen only for packed training rows (no cache, no padding mask); else the stock kernel
        varlen = self.attention == "varlen" and cache is None and attention_mask is None and position_ids is not None
        self.hf_config._attn_implementation = VARLEN if varlen else self.config.llm.attn_implementation
        if varlen:
            kwargs.update(varlen_metadata(position_ids))
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=cache is not None, **kwargs)
        return out.last_hidden_state

    def forward(self, input_ids, labels=None, attention_mask=None, position_ids=None,
                images: ContinuousImages | None = None, loss_weights=None,
                num_global_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """Args: input_ids/labels/attention_mask/position_ids: [b, T]; loss_weights: optional
        [b, T] per-token weights of the cross-entropy; num_global_tokens: the supervised tokens of
        the global batch when this is one rank's part of it (see ``loss``).

        Returns:
            {"loss", "ce", "z_loss", "num_tokens"} when labels are given, else {"logits"}.
        """
        hidden = self.hidden_states(self.embed(input_ids, images), attention_mask, position_ids)
        if labels is None:
            return {"logits": self.lm_head(hidden)}
        return self.loss(hidden, labels, loss_weights, num_global_tokens)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
             num_global_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy over the full vocabulary (image logits NOT masked) + z-loss.

        Without ``weights`` the cross-entropy is the mean over supervised tokens; with weights
        [b, T] (aligned with ``labels``, summing to 1) it is their weighted sum.

        With ``num_global_tokens`` (data parallelism: the supervised tokens of all ranks) the mean
        cross-entropy and the z-loss divide by that count instead of this batch's, so that the
        ranks' losses sum to the global batch's; weights must then sum to 1 over all ranks.

        Only labelled positions go through the head, so the [b, T, vocab] logits of context
        tokens are never built; with ``ce_chunk`` > 0 not even those of all labelled positions
        at once (``unitoken.model.loss``). z-loss (PaLM): weight * mean(logsumexp(logits)^2),
        which keeps the softmax normaliser near 1 in bf16.
        """
        targets = labels[:, 1:]
        keep = targets != IGNORE
        num_tokens = keep.sum()
        if int(num_tokens) == 0:
            raise ValueError("batch has no supervised tokens (all labels are -100)")
        if self.ce_chunk > 0:
            w = None if weights is None else weights[:, 1:][keep]
            loss, ce, z = self.lm_head(hidden[:, :-1][keep], targets[keep], w, self.config.z_loss_weight,
                                       self.ce_chunk, num_global_tokens)
            return {"loss": loss, "ce": ce, "z_loss": z, "num_tokens": num_tokens}
        logits = self.lm_head(hidden[:, :-1][keep]).float()
        lse = torch.logsumexp(logits, dim=-1)
        per_token = lse - logits.gather(1, targets[keep].unsqueeze(1)).squeeze(1)
        # this batch's mean times its share of the global count (exactly 1.0 in one process, which
        # keeps single-process numbers bit-identical to a plain mean)
        share = 1.0 if num_global_tokens is None else int(num_tokens) / num_global_tokens
        ce = per_token.mean() * share if weights is None else (per_token * weights[:, 1:][keep].float()).sum()
        z = (lse ** 2).mean() * share
        loss = ce + self.config.z_loss_weight * z
        return {"loss": loss, "ce": ce.detach(), "z_loss": z.detach(), "num_tokens": num_tokens}

    def num_parameters(self) -> dict[str, int]:
        counts = {name: sum(p.numel() for p in getattr(self, name).parameters())
                  for name in (*FREEZE_PREFIXES, "vq") if getattr(self, name) is not None}
        counts["total"] = sum(counts.values())
        return counts
