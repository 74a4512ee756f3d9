"""The dual-track "swap" transformer (seed: swap-transformer-readme.txt).

Two tracks, A and B, each a stack of ``n_layer`` pre-norm blocks with their own weights,
read the token embedding ``x``. Each further pass runs the same track weights again on
swapped inputs: ``in_b = out_a + x`` and ``in_a = out_b + x``, so each track refines the
other's view of the sequence; ``num_loops`` passes make ``num_loops - 1`` swaps. With
``use_swap = false`` each track reads its own output instead (``in_a = out_a + x``), which
isolates the effect of the exchange; ``num_loops = 1`` is a parallel ensemble of two
stacks. The head reads ``RMSNorm(out_a + out_b)``.

Shapes: ``input_ids`` (B, T) -> embeddings and track states (B, T, n_embd) -> logits
(B, T, vocab_size). Parameters do not depend on ``num_loops``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from parallax.config import ModelConfig
from parallax.models.layers import KVCache, RMSNorm, TransformerBlock, init_weights
from parallax.models.output import ModelOutput, lm_loss
from parallax.registry import MODELS


@dataclass
class SwapConfig(ModelConfig):
    block_size: int = 512  # context window in tokens
    n_layer: int = 6  # blocks per track
    n_head: int = 4
    n_kv_heads: int = 2
    n_embd: int = 512
    dropout: float = 0.0
    num_loops: int = 2  # passes through each track; num_loops - 1 swaps
    use_swap: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def validate(self) -> None:
        if min(self.block_size, self.n_layer, self.n_head, self.n_kv_heads, self.n_embd, self.num_loops) < 1:
            raise ValueError("block_size, n_layer, n_head, n_kv_heads, n_embd and num_loops must be at least 1")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_heads:
            raise ValueError("n_embd must divide by n_head, and n_head by n_kv_heads")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("the head dimension n_embd / n_head must be even for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")


class SwapCache:
    """KV caches for incremental decoding: ``layers[pass][track][layer]``.

    Every pass of every track needs its own cache, because the passes share weights but
    read different inputs, so their keys and values differ.
    """

    def __init__(self, model: "SwapTransformer", batch: int, max_len: int, static: bool = False):
        p = model.embed.weight
        self.layers = [
            [[blk.attn.new_cache(batch, max_len, p.device, p.dtype, static) for blk in track] for track in model.tracks]
            for _ in range(model.config.num_loops)
        ]

    @property
    def length(self) -> int:
        return self.layers[0][0][0].length


@MODELS.register("swap", SwapConfig, "dual-track weight-tied transformer whose tracks swap outputs between passes")
class SwapTransformer(nn.Module):
    def __init__(self, cfg: SwapConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.tracks = nn.ModuleList(
            nn.ModuleList(
                TransformerBlock(cfg.n_embd, cfg.n_head, cfg.n_kv_heads, dropout=cfg.dropout, norm_eps=cfg.norm_eps)
                for _ in range(cfg.n_layer)
            )
            for _track in ("a", "b")
        )
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        init_weights(self)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self, batch: int, max_len: int, static: bool = False) -> SwapCache:
        return SwapCache(self, batch, max_len, static)

    @staticmethod
    def _run_track(blocks: nn.ModuleList, h: Tensor, caches: list[KVCache] | None) -> Tensor:
        for i, block in enumerate(blocks):
            h = block(h, caches[i] if caches is not None else None)
        return h

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        cache: SwapCache | None = None,
    ) -> ModelOutput:
        track_a, track_b = self.tracks
        x = self.embed(input_ids)
        in_a = in_b = x
        for p in range(self.config.num_loops):
            caches = cache.layers[p] if cache is not None else (None, None)
            out_a = self._run_track(track_a, in_a, caches[0])
            out_b = self._run_track(track_b, in_b, caches[1])
            if self.config.use_swap:
                in_a, in_b = out_b + x, out_a + x
            else:
                in_a, in_b = out_a + x, out_b + x
        logits = self.lm_head(self.norm(out_a + out_b))
        loss = lm_loss(logits, targets, loss_mask) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)
