"""Recurrent-depth transformer: prelude -> weight-tied core iterated r times -> coda.

The scaled model of shared/seeds/eam-readme.txt: a modern decoder (RMSNorm, SwiGLU, RoPE,
QK-norm, GQA, optional sliding window, optional mixture-of-experts MLPs) whose depth is a
test-time knob. The prelude embeds the tokens into ``e`` (B, T, D); the core blocks are applied
r times to a state ``s``; the coda reads the final state out to logits.

Re-grounding (``reground``) decides how the input re-enters each iteration:

* ``adapter``: ``s <- core(W [s; e])`` from ``s = 0`` (Huginn-style concatenation adapter);
* ``add``:     ``s <- core(s + e)`` from ``s = 0``;
* ``none``:    ``s <- core(s)`` from ``s = e``: the input is seen once, so the state may drift.
  With truncated backprop the prelude then learns only from steps where r <= backprop_depth.

Training samples r per step (``iterations``: ``poisson_lognormal`` as Huginn — ``tau ~
N(log(mean) - sigma^2/2, sigma)``, ``r = 1 + Poisson(e^tau)`` — or ``uniform`` over
``[min_iterations, max_iterations]``, or ``fixed`` at ``mean_iterations``), clamped to
``[min_iterations, max_iterations]``, and backpropagates through the last ``backprop_depth``
iterations only, so training memory does not grow with r (``backprop_depth = 0``: through all
of them; memory then grows with r). Truncation that leaves out the first iteration can stall a
small model: on ``chain_root`` (CPU, d 64) fixed r = 4 learned depth 1 to 0.95 with gradient
through all four iterations and sat at 0.5 with the last two. Sampled r stayed at guessing
there unless ``supervise_iterations`` also trains the prediction decoded after every live
iteration, which makes the answer a fixed point (as accurate at r = 16 as at r = 1). In eval mode r is
``config.test_iterations``, read at call time so evaluation can turn the dial (or pass
``iterations=`` explicitly).

Diagnostics: ``k_used`` (B, T) filled with r; ``residual`` (r,) the relative state change
``||s_i - s_{i-1}|| / ||s_i||`` per iteration (the drift of the latent state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from parallax.config import ModelConfig
from parallax.models.layers import RMSNorm, TransformerBlock, check_rope, init_weights
from parallax.models.moe import MixtureOfExperts
from parallax.models.output import ModelOutput, lm_loss
from parallax.ops.fixed_point import relative_residual
from parallax.registry import MODELS

REGROUNDING = ("adapter", "add", "none")
SAMPLING = ("poisson_lognormal", "uniform", "fixed")


@dataclass
class RecurrentConfig(ModelConfig):
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 -> n_heads
    prelude_layers: int = 1
    core_layers: int = 1
    coda_layers: int = 1
    rope_base: float = 10000.0
    qk_norm: bool = True
    window: int = 0  # sliding-window attention span; 0 -> full causal attention
    dropout: float = 0.0
    norm_eps: float = 1e-5
    moe_experts: int = 0  # 0 -> dense SwiGLU MLPs
    moe_top_k: int = 2
    moe_aux_weight: float = 0.01
    reground: str = "adapter"  # adapter | add | none
    iterations: str = "poisson_lognormal"  # poisson_lognormal | uniform | fixed
    mean_iterations: int = 4
    min_iterations: int = 1
    max_iterations: int = 16
    iteration_sigma: float = 0.5
    backprop_depth: int = 2  # the last iterations trained with gradient; 0: all of them (memory grows with r)
    test_iterations: int = 4
    # train the prediction decoded after every live iteration, not only the last one; the
    # train loss is then their mean and is not comparable with the (last-iteration) val loss
    supervise_iterations: bool = False
    tie_embeddings: bool = True

    def validate(self) -> None:
        kv = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads or self.n_heads % kv:
            raise ValueError("d_model must divide by n_heads, and n_heads by n_kv_heads")
        check_rope(self.d_model // self.n_heads, self.rope_base, "the head dimension d_model / n_heads")
        if self.reground not in REGROUNDING:
            raise ValueError(f"reground must be one of {', '.join(REGROUNDING)}")
        if self.iterations not in SAMPLING:
            raise ValueError(f"iterations must be one of {', '.join(SAMPLING)}")
        if not 1 <= self.min_iterations <= self.mean_iterations <= self.max_iterations:
            raise ValueError("need 1 <= min_iterations <= mean_iterations <= max_iterations")
        if self.backprop_depth < 0 or self.test_iterations < 1 or self.core_layers < 1:
            raise ValueError("backprop_depth must be >= 0 (0: all iterations); test_iterations and core_layers >= 1")
        if self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError("moe_top_k must be between 1 and moe_experts")


class RecurrentCache:
    """KV caches for incremental decoding at a fixed r: prelude, r copies of the core, coda."""

    def __init__(
        self, model: "RecurrentDepthTransformer", batch: int, max_len: int, iterations: int, static: bool = False
    ):
        p = model.embed.weight

        def caches(blocks):
            return [blk.attn.new_cache(batch, max_len, p.device, p.dtype, static) for blk in blocks]

        self.iterations = iterations
        self.prelude = caches(model.prelude)
        self.core = [caches(model.core) for _ in range(iterations)]
        self.coda = caches(model.coda)

    @property
    def length(self) -> int:
        return self.coda[0].length if self.coda else self.prelude[0].length if self.prelude else self.core[0][0].length


@MODELS.register("recurrent", RecurrentConfig, "recurrent-depth transformer: weight-tied core iterated r times")
class RecurrentDepthTransformer(nn.Module):
    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prelude = nn.ModuleList(self._block() for _ in range(cfg.prelude_layers))
        self.core = nn.ModuleList(self._block() for _ in range(cfg.core_layers))
        self.coda = nn.ModuleList(self._block() for _ in range(cfg.coda_layers))
        self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False) if cfg.reground == "adapter" else None
        self.state_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.moe_layers = [m for m in self.modules() if isinstance(m, MixtureOfExperts)]

    def _block(self) -> TransformerBlock:
        cfg = self.config
        mlp = MixtureOfExperts(cfg.d_model, cfg.moe_experts, cfg.moe_top_k) if cfg.moe_experts else None
        return TransformerBlock(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads or None, rope_base=cfg.rope_base, qk_norm=cfg.qk_norm,
            window=cfg.window or None, dropout=cfg.dropout, norm_eps=cfg.norm_eps, mlp=mlp,
        )

    def new_cache(
        self, batch: int, max_len: int, iterations: int | None = None, static: bool = False
    ) -> RecurrentCache:
        return RecurrentCache(self, batch, max_len, iterations or self.config.test_iterations, static)

    def sample_iterations(self) -> int:
        """Draw r for one training step from the configured distribution (torch's global RNG)."""
        cfg = self.config
        if cfg.iterations == "fixed":
            return cfg.mean_iterations
        if cfg.iterations == "uniform":
            return int(torch.randint(cfg.min_iterations, cfg.max_iterations + 1, ()).item())
        sigma = cfg.iteration_sigma
        tau = torch.randn(()) * sigma + math.log(cfg.mean_iterations) - 0.5 * sigma**2
        r = 1 + int(torch.poisson(tau.exp()).item())
        return max(cfg.min_iterations, min(cfg.max_iterations, r))

    def core_step(self, s: Tensor, e: Tensor, caches=None) -> Tensor:
        """One iteration of the weight-tied core, re-grounded on the prelude output ``e``.

        The new state is RMS-normalised: without it nothing bounds ``|s|`` over iterations (a
        trained adapter amplifies it each pass), so beyond the trained r it overflows (bf16 and
        then fp32) and the logits turn NaN.
        """
        reground = self.config.reground
        if reground == "adapter":
            s = self.adapter(torch.cat([s, e], dim=-1))
        elif reground == "add":
            s = s + e
        for i, block in enumerate(self.core):
            s = block(s, caches[i] if caches is not None else None)
        return self.state_norm(s)

    def decode(self, s: Tensor, cache: RecurrentCache | None = None) -> Tensor:
        """Logits from a core state: the coda, the final norm and the LM head."""
        for i, block in enumerate(self.coda):
            s = block(s, cache.coda[i] if cache is not None else None)
        return self.lm_head(self.norm(s))

    def shard_units(self) -> list[nn.Module]:
        """Prelude and coda blocks run once per forward: FSDP2 gathers their weights one at a
        time. The core, iterated r times, stays with the root's weights, and so does the coda
        when it decodes every live iteration (``supervise_iterations``, training with targets)."""
        return [*self.prelude] + ([] if self.config.supervise_iterations else [*self.coda])

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        cache: RecurrentCache | None = None,
        iterations: int | None = None,
    ) -> ModelOutput:
        cfg = self.config
        if cache is not None:
            r = cache.iterations
        elif iterations is not None:
            r = iterations
        else:
            r = self.sample_iterations() if self.training else cfg.test_iterations
        live = min(r, cfg.backprop_depth or r) if self.training else r
        aux: list[Tensor] = []

        def collect_aux() -> None:  # each MoE call leaves its balance loss; take each once
            for m in self.moe_layers:
                if m.aux_loss is not None:
                    aux.append(m.aux_loss)
                    m.aux_loss = None

        e = self.embed(input_ids)
        for i, block in enumerate(self.prelude):
            e = block(e, cache.prelude[i] if cache is not None else None)
        collect_aux()
        s = e if cfg.reground == "none" else torch.zeros_like(e)
        residuals, early_losses = [], []
        supervise_early = cfg.supervise_iterations and self.training and targets is not None
        for i in range(r):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= r - live):
                new = self.core_step(s, e, cache.core[i] if cache is not None else None)
            residuals.append(relative_residual(new, s))
            s = new
            collect_aux()
            if supervise_early and r - live <= i < r - 1:
                early_losses.append(lm_loss(self.decode(s), targets, loss_mask))
                collect_aux()
        logits = self.decode(s, cache)
        collect_aux()
        loss = None
        if targets is not None:
            loss = torch.stack([*early_losses, lm_loss(logits, targets, loss_mask)]).mean()
            if aux:
                loss = loss + cfg.moe_aux_weight * torch.stack(aux).mean()
        b, t = input_ids.shape
        diagnostics = {
            "k_used": torch.full((b, t), float(r), device=input_ids.device),
            "residual": torch.stack(residuals),
        }
        return ModelOutput(logits=logits, loss=loss, diagnostics=diagnostics)
