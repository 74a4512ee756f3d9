"""The motor decoder: two causal transformer layers over a short window of settled states.

It reads the settled workspace states (B, T, d) through sliding-window attention of at most
``MAX_DECODER_WINDOW`` (16) positions, so emitting a token depends on the recent settled
states only; everything longer-range must pass through the workspace. The LM head (tied to
the token embedding) lives in the model.
"""

from __future__ import annotations

from torch import Tensor, nn

from parallax.models.layers import KVCache, RMSNorm, TransformerBlock

DECODER_LAYERS = 2


class MotorDecoder(nn.Module):
    def __init__(self, dim: int, n_heads: int, window: int, rope_base: float, norm_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, n_heads, rope_base=rope_base, window=window, norm_eps=norm_eps)
            for _ in range(DECODER_LAYERS)
        )
        self.norm = RMSNorm(dim, norm_eps)

    def new_cache(self, batch: int, max_len: int, device, dtype, static: bool = False) -> list[KVCache]:
        return [block.attn.new_cache(batch, max_len, device, dtype, static) for block in self.blocks]

    def forward(self, settled: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """Settled states (B, T, d) -> features (B, T, d) for the LM head."""
        x = settled
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None)
        return self.norm(x)
