"""The baseline: a standard pre-norm decoder-only transformer built from the shared layers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from parallax.config import ModelConfig
from parallax.models.layers import RMSNorm, TransformerBlock, check_rope, init_weights
from parallax.models.output import ModelOutput, lm_loss
from parallax.registry import MODELS


@dataclass
class TransformerConfig(ModelConfig):
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 -> n_heads (plain multi-head attention)
    rope_base: float = 10000.0
    qk_norm: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def validate(self) -> None:
        kv = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads or self.n_heads % kv:
            raise ValueError("d_model must divide by n_heads, and n_heads by n_kv_heads")
        check_rope(self.d_model // self.n_heads, self.rope_base, "the head dimension d_model / n_heads")


class TransformerCache:
    """Per-layer KV caches for incremental decoding."""

    def __init__(self, model: "Transformer", batch: int, max_len: int, static: bool = False):
        p = model.embed.weight
        self.layers = [blk.attn.new_cache(batch, max_len, p.device, p.dtype, static) for blk in model.blocks]

    @property
    def length(self) -> int:
        return self.layers[0].length


@MODELS.register("transformer", TransformerConfig, "pre-norm decoder-only transformer baseline")
class Transformer(nn.Module):
    """Token embedding -> n pre-norm blocks (GQA, RoPE, SwiGLU) -> RMSNorm -> tied LM head."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.d_model,
                cfg.n_heads,
                cfg.n_kv_heads or None,
                rope_base=cfg.rope_base,
                qk_norm=cfg.qk_norm,
                dropout=cfg.dropout,
                norm_eps=cfg.norm_eps,
            )
            for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self, batch: int, max_len: int, static: bool = False) -> TransformerCache:
        return TransformerCache(self, batch, max_len, static)

    def shard_units(self) -> list[nn.Module]:
        """Blocks that run once per forward: FSDP2 gathers their weights one at a time."""
        return list(self.blocks)

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        cache: TransformerCache | None = None,
    ) -> ModelOutput:
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None)
        logits = self.lm_head(self.norm(x))
        loss = lm_loss(logits, targets, loss_mask) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)
