"""The Central Workspace model: token-clocked experts, K-iteration workspace, motor decoder.

Forward pass over input_ids (B, T):

1. embed the tokens; one token-clocked pass over them (SSM scan, probe keys/values);
2. settle the workspace for every position (``settle``), halting per token;
3. the motor decoder reads the settled states; the LM head is tied to the embedding.

``k_max``, ``k_min``, ``halting``, ``halt_rule``, ``halt_tol``, ``live_steps``, ``loop``,
``read``, ``compile_step`` and ``cuda_graph`` are read from ``self.config`` at each call, so a
built model can be evaluated at several K.
Diagnostics: ``k_used`` (B, T) and ``settle_trace`` (B, T, k_max), see ``halting``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from parallax.models.cws.config import CWSConfig
from parallax.models.cws.decoder import MotorDecoder
from parallax.models.cws.pool import ExpertPool, PoolCache
from parallax.models.cws.settle import settle
from parallax.models.cws.workspace import Workspace
from parallax.models.layers import KVCache, init_weights
from parallax.models.output import ModelOutput, lm_loss
from parallax.registry import MODELS


class CWSCache:
    """Incremental-generation state: token-clocked pool state and the decoder's KV caches."""

    def __init__(self, model: "CWS", batch: int, max_len: int, static: bool = False):
        p = model.embed.weight
        self.pool: PoolCache = model.pool.new_cache(batch, max_len, p.device, p.dtype, static)
        self.decoder: list[KVCache] = model.decoder.new_cache(batch, max_len, p.device, p.dtype, static)
        self.length = 0


@MODELS.register("cws", CWSConfig, "Central Workspace: a small state settling over K iterations per token")
class CWS(nn.Module):
    def __init__(self, cfg: CWSConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size < 1:
            raise ValueError("CWSConfig.vocab_size must be set (> 0) before building the model")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pool = ExpertPool(cfg)
        self.workspace = Workspace(cfg)
        self.decoder = MotorDecoder(
            cfg.d_model, cfg.decoder_heads, cfg.decoder_window, cfg.rope_base, cfg.norm_eps
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self)
        self.pool.reset_expert_parameters()
        self.lm_head.weight = self.embed.weight

    def new_cache(self, batch: int, max_len: int, static: bool = False) -> CWSCache:
        """``static`` (KV caches of fixed shapes, ``KVCache``) for a decoding step captured whole
        as a CUDA graph, and for ``cuda_graph``'s per-iteration graphs, which need it too."""
        return CWSCache(self, batch, max_len, static or self.config.cuda_graph)

    def halting_active(self) -> bool:
        cfg = self.config
        return cfg.halting and (cfg.halt_in_training or not self.training)

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        cache: CWSCache | None = None,
    ) -> ModelOutput:
        cfg = self.config
        x = self.embed(input_ids)
        context = self.pool.token_clocked(x, cache.pool if cache is not None else None)
        settled = settle(
            self.workspace,
            self.pool,
            context,
            k_max=cfg.k_max,
            k_min=cfg.k_min,
            halting=self.halting_active(),
            rule=cfg.halt_rule,
            tol=cfg.halt_tol,
            live_steps=cfg.live_steps if torch.is_grad_enabled() else 0,
            loop=cfg.loop,
            compile_step=cfg.compile_step,
            cuda_graph=cfg.cuda_graph,
        )
        logits = self.lm_head(self.decoder(settled.h, cache.decoder if cache is not None else None))
        if cache is not None:
            cache.length += input_ids.shape[1]
        loss = lm_loss(logits, targets, loss_mask) if targets is not None else None
        return ModelOutput(
            logits=logits,
            loss=loss,
            diagnostics={"k_used": settled.k_used, "settle_trace": settled.trace},
        )
