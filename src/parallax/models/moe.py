"""Mixture-of-experts MLP: top-k routed SwiGLU experts with a load-balancing auxiliary loss.

A drop-in for a block's MLP (``TransformerBlock(mlp=MixtureOfExperts(...))``): it maps
(B, T, D) -> (B, T, D). Each token goes to the ``top_k`` experts with the largest router
probabilities, weighted by those probabilities renormalised to sum to one. Because a block's MLP
returns one tensor, the Switch-Transformer balance loss of the latest call,
``n_experts * sum_e f_e * P_e`` (f_e: fraction of routed slots taken by expert e, P_e: its mean
router probability; 1.0 when perfectly balanced), is left on ``self.aux_loss`` for the model to
collect. ``forward`` dispatches only the routed tokens to each expert; ``forward_reference``
runs every expert on every token and is its twin for tests, and what runs in a step of a
CUDA graph (``graph_step.py``), where the dispatch cannot read its token counts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from parallax.models.graph_step import in_graph_step
from parallax.models.layers import SwiGLU


class MixtureOfExperts(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int = 2, hidden: int | None = None):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be between 1 and n_experts ({n_experts}), got {top_k}")
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(n_experts))
        self.aux_loss: Tensor | None = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, D) tokens -> (N, k) expert indices and (N, k) combine weights; sets ``aux_loss``."""
        probs = self.router(x).float().softmax(-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)
        # f_e; compared with each expert id rather than one_hot, which checks its input on the host
        chosen = experts.unsqueeze(-1) == torch.arange(self.n_experts, device=experts.device)
        load = chosen.float().sum(1).mean(0) / self.top_k
        self.aux_loss = self.n_experts * (load * probs.mean(0)).sum()
        return experts, (weights / weights.sum(-1, keepdim=True)).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if in_graph_step():  # the dispatch below reads each expert's token count on the host
            return self.forward_reference(x)
        flat = x.reshape(-1, x.shape[-1])
        experts, weights = self.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (experts == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot].unsqueeze(-1))
        return out.view_as(x)

    def forward_reference(self, x: Tensor) -> Tensor:
        """Dense twin: every expert on every token, combined with the routed weights."""
        flat = x.reshape(-1, x.shape[-1])
        experts, weights = self.route(flat)
        all_out = torch.stack([expert(flat) for expert in self.experts], 1)  # (N, E, D)
        gate = torch.zeros(flat.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
        gate.scatter_(1, experts, weights)
        return (gate.unsqueeze(-1) * all_out).sum(1).view_as(x)
