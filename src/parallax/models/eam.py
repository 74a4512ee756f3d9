"""EAM: the equilibrium associative memory (shared/seeds/eam-readme.txt).

One weight-tied block ``z <- f(z, x)`` — attention read as the modern Hopfield retrieval rule
``softmax(QK^T/sqrt d) V`` plus a SwiGLU MLP — is solved to a fixed point ``z* = f(z*, x)``.
Only the last ``grad_tail`` solver steps carry gradient (Jacobian-free backprop when
``grad_tail=1``), so training memory does not grow with ``solver_steps``; ``gradient =
"implicit"`` instead takes the exact implicit-function-theorem gradient. Positions are bound
into tokens by HRR circular convolution with unitary role vectors ``r_t = r^{⊛t}`` and unbound
again before the read-out (``no_binding`` ablates this for a learned additive position table).
The model is non-causal: it is trained as a masked denoiser and decodes MaskGIT-style,
committing the most confident answer tokens on a cosine schedule over ``decode_steps`` passes.

Fitting the shared next-token batch. The full sequence is ``cat(input_ids[:, :1], targets)``
(L = T + 1 tokens); answer positions are ``loss_mask`` shifted right by one. Returned logits are
aligned with ``targets`` (``logits[:, t]`` predicts ``targets[:, t]``), so the shared loss and
accuracy code applies unchanged:

* training (``targets`` given): a cosine-schedule fraction of each sequence's answer tokens is
  replaced by ``[MASK]`` and the loss is cross-entropy on those tokens only;
* evaluation (no ``targets``; ``loss_mask`` given): every answer token is hidden and decoded;
  at each answer position the logits are those the token was committed from, so their argmax
  is the generated token and shared metrics measure generation accuracy.

The solver step is damped, ``z <- z + damping * (f(z) - z)`` (same fixed points): undamped,
trained blocks tend to settle into a period-2 oscillation with residual ~0.5; at the default
0.5 the residual keeps falling (~0.02 after 8 steps on copy).

Diagnostics (of the last solve): ``residual`` (S,) ``||z_k+1 - z_k|| / ||z_k+1||`` and ``energy``
(S,) the Hopfield energy ``-sqrt(d) lse(q·k / sqrt(d)) + |q|^2 / 2`` averaged over queries.

The seed's ``run.py`` switches map to config keys (``parallax train model.name=eam ...``):

=================  ==========================================
seed switch        config key
=================  ==========================================
``--task``         ``data.name`` (copy | reverse | sort)
``--grad-tail``    ``model.grad_tail``
``--solver-steps`` ``model.solver_steps``
``--no-binding``   ``model.no_binding=true``
``--dim``          ``model.dim``
``--heads``        ``model.heads``
``--length``       ``data.length``
``--steps``        ``train.steps``
``--batch``        ``train.batch_size``
``--no-amp``       ``train.precision=fp32``
=================  ==========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallax.config import ModelConfig
from parallax.models.layers import RMSNorm, SwiGLU, init_weights
from parallax.models.output import ModelOutput
from parallax.ops.fixed_point import anderson, implicit_gradient, iterate
from parallax.ops.hrr import circular_bind, circular_unbind, unitary_role_powers
from parallax.registry import MODELS

SOLVERS = ("iterate", "anderson")
GRADIENTS = ("tail", "implicit")


@dataclass
class EAMConfig(ModelConfig):
    dim: int = 128
    heads: int = 4
    mlp_hidden: int = 0  # 0 -> SwiGLU default (8/3 * dim)
    solver_steps: int = 12  # evaluations of the block per solve
    grad_tail: int = 2  # last solver steps that carry gradient (gradient = "tail")
    solver: str = "iterate"  # iterate | anderson
    anderson_memory: int = 5
    gradient: str = "tail"  # tail (truncated / Jacobian-free) | implicit (IFT)
    adjoint_steps: int = 0  # IFT backward solver steps; 0 -> solver_steps
    damping: float = 0.5  # solver step z <- z + damping * (f(z) - z); 1.0 = plain f
    no_binding: bool = False  # learned additive positions instead of HRR binding
    decode_steps: int = 8  # MaskGIT passes at evaluation
    norm_eps: float = 1e-5

    def validate(self) -> None:
        if self.dim % self.heads or self.dim % 2:
            raise ValueError("dim must be even and divide by heads")
        if not 1 <= self.grad_tail <= self.solver_steps:
            raise ValueError("grad_tail must be between 1 and solver_steps")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}")
        if not 0.0 < self.damping <= 1.0:
            raise ValueError("damping must be in (0, 1]")
        if self.decode_steps < 1 or self.anderson_memory < 1 or self.adjoint_steps < 0:
            raise ValueError("decode_steps and anderson_memory must be >= 1, adjoint_steps >= 0")


class AssocBlock(nn.Module):
    """``f(z, x)``: Hopfield retrieval over ``z + x``, then an MLP; ``z`` enters only normalised.

    ``h = x + retrieve(norm(z + x))``, ``f = h + mlp(norm(h))``. Without an identity path from
    ``z`` the map can contract, so iterating it settles. Shapes: (B, L, D) -> (B, L, D).
    """

    def __init__(self, dim: int, heads: int, hidden: int | None, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.attn_norm = RMSNorm(dim, eps)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def retrieve(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Non-causal softmax retrieval and its Hopfield energy (a 0-dim fp32 tensor)."""
        b, length, _ = u.shape
        split = lambda t: t.view(b, length, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.wq(u)), split(self.wk(u)), split(self.wv(u))
        beta = 1.0 / math.sqrt(self.head_dim)
        scores = (q @ k.transpose(-1, -2)) * beta  # (B, H, L, L)
        out = scores.softmax(-1) @ v
        energy = -torch.logsumexp(scores.float(), -1) / beta + 0.5 * q.float().pow(2).sum(-1)
        return self.wo(out.transpose(1, 2).reshape(b, length, -1)), energy.detach().mean()

    def forward(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        retrieved, energy = self.retrieve(self.attn_norm(z + x))
        h = x + retrieved
        return h + self.mlp(self.mlp_norm(h)), energy


@MODELS.register("eam", EAMConfig, "equilibrium associative memory: fixed-point block, HRR positions, MaskGIT decoding")
class EquilibriumAssocMemory(nn.Module):
    def __init__(self, cfg: EAMConfig):
        super().__init__()
        self.config = cfg
        self.mask_id = cfg.vocab_size  # one extra embedding row; never predicted
        self.embed = nn.Embedding(cfg.vocab_size + 1, cfg.dim)
        if cfg.no_binding:
            self.positions = nn.Embedding(cfg.max_seq_len + 1, cfg.dim)
        else:
            phases = torch.rand(cfg.dim // 2 + 1, generator=torch.Generator().manual_seed(0)) * 2 * math.pi
            self.role_phases = nn.Parameter(phases)
        self.block = AssocBlock(cfg.dim, cfg.heads, cfg.mlp_hidden or None, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        init_weights(self)
        # Zero output projections: at init f(z, x) = x, so z* = x keeps every position's token and
        # role. With std-0.02 projections the block's outputs grow as sqrt(dim) while x does not,
        # and at dim >= 256 the fixed point collapses to one vector shared by every position
        # (mean cosine 0.94 between positions at dim 256), from which nothing is learned.
        nn.init.zeros_(self.block.wo.weight)
        nn.init.zeros_(self.block.mlp.w3.weight)

    # -- the fixed point ---------------------------------------------------------------------

    def roles(self, length: int) -> Tensor:
        """(L, D) unitary position roles ``r^{⊛t}``."""
        return unitary_role_powers(self.role_phases, torch.arange(length, device=self.role_phases.device))

    def inject(self, tokens: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, D) input ``x``: token embeddings with their positions bound in."""
        e = self.embed(tokens)
        if self.config.no_binding:
            return e + self.positions.weight[: tokens.shape[1]]
        return circular_bind(e, self.roles(tokens.shape[1]).to(e.dtype))

    def read_out(self, z: Tensor) -> Tensor:
        """(B, L, D) equilibrium -> (B, L, V) logits, unbinding each position's role first."""
        if not self.config.no_binding:
            z = circular_unbind(z, self.roles(z.shape[1]).to(z.dtype))
        return self.lm_head(self.norm(z))

    def solve(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Solve ``z* = f(z*, x)`` from ``z = 0``; returns ``(z*, residual (S,), energy (S,))``."""
        cfg = self.config
        energies: list[Tensor] = []

        def step(z: Tensor) -> Tensor:
            z_next, energy = self.block(z, x)
            energies.append(energy)
            return z + cfg.damping * (z_next - z) if cfg.damping != 1.0 else z_next

        def solver(f, z0, steps):
            if cfg.solver == "anderson":
                return anderson(f, z0, steps, memory=cfg.anderson_memory)
            return iterate(f, z0, steps)

        z0 = torch.zeros_like(x)
        if cfg.gradient == "implicit":
            with torch.no_grad():
                z, residual = solver(step, z0, cfg.solver_steps)
            if torch.is_grad_enabled():
                z = implicit_gradient(lambda s: self.block(s, x)[0], z, cfg.adjoint_steps or cfg.solver_steps)
        else:
            with torch.no_grad():
                z, frozen = solver(step, z0, cfg.solver_steps - cfg.grad_tail)
            z, live = iterate(step, z, cfg.grad_tail)
            residual = torch.cat([frozen, live])
        return z, residual, torch.stack(energies[: cfg.solver_steps])

    def denoise(self, tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, L) tokens with ``mask_id`` holes -> (B, L, V) logits and solver diagnostics."""
        z, residual, energy = self.solve(self.inject(tokens))
        return self.read_out(z), {"residual": residual, "energy": energy}

    # -- training and decoding ---------------------------------------------------------------

    def forward(
        self, input_ids: Tensor, targets: Tensor | None = None, loss_mask: Tensor | None = None
    ) -> ModelOutput:
        b = input_ids.shape[0]
        last = targets[:, -1:] if targets is not None else input_ids.new_full((b, 1), self.mask_id)
        sequence = torch.cat([input_ids, last], dim=1)  # (B, L) = cat(input_ids[:, :1], targets)
        answer = torch.zeros_like(sequence, dtype=torch.bool)
        answer[:, 1:] = loss_mask.bool() if loss_mask is not None else True
        if targets is not None:
            return self.denoising_loss(sequence, answer)
        _, logits, diagnostics = self.decode(sequence, answer)
        return ModelOutput(logits=logits[:, 1:], diagnostics=diagnostics)

    def denoising_loss(self, sequence: Tensor, answer: Tensor) -> ModelOutput:
        """Hide a cosine-schedule fraction (at least one) of each row's answer tokens; CE on them."""
        b, length = sequence.shape
        ratio = torch.cos(0.5 * math.pi * torch.rand(b, 1, device=sequence.device))
        n_hidden = (ratio * answer.sum(1, keepdim=True)).ceil().clamp(min=1)
        hidden = answer & (_rank(torch.rand(b, length, device=sequence.device), answer) < n_hidden)
        logits, diagnostics = self.denoise(sequence.masked_fill(hidden, self.mask_id))
        loss = F.cross_entropy(logits[hidden].float(), sequence[hidden]) if hidden.any() else logits.sum() * 0
        return ModelOutput(logits=logits[:, 1:], loss=loss, diagnostics=diagnostics)

    @torch.no_grad()
    def decode(self, sequence: Tensor, answer: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """MaskGIT decoding: hide every answer token, then over ``decode_steps`` passes commit the
        most confident predictions so that ``ceil(n * cos(pi/2 * s/S))`` stay hidden after pass s.

        Returns the decoded (B, L) tokens, (B, L, V) logits (at answer positions, those each token
        was committed from) and the diagnostics of the last pass.
        """
        steps = self.config.decode_steps
        tokens = sequence.masked_fill(answer, self.mask_id)
        hidden = answer.clone()
        total = answer.sum(1, keepdim=True).float()
        committed_logits = None
        for s in range(1, steps + 1):
            logits, diagnostics = self.denoise(tokens)
            if committed_logits is None:
                committed_logits = torch.zeros_like(logits)
            confidence, prediction = logits.float().softmax(-1).max(-1)
            keep_hidden = torch.floor(total * math.cos(0.5 * math.pi * s / steps))
            n_hidden = hidden.sum(1, keepdim=True).float()
            keep_hidden = torch.minimum(keep_hidden, (n_hidden - 1).clamp(min=0))  # progress every pass
            commit = hidden & (_rank(confidence, hidden, descending=True) < n_hidden - keep_hidden)
            tokens = torch.where(commit, prediction, tokens)
            committed_logits = torch.where(commit.unsqueeze(-1), logits, committed_logits)
            hidden &= ~commit
        final = torch.where(answer.unsqueeze(-1), committed_logits, logits)
        return tokens, final, diagnostics


def _rank(scores: Tensor, eligible: Tensor, descending: bool = False) -> Tensor:
    """(B, L) rank of each eligible position by ``scores`` within its row; ineligible rank last."""
    fill = float("-inf") if descending else float("inf")
    order = scores.float().masked_fill(~eligible, fill).argsort(dim=1, descending=descending)
    return order.argsort(dim=1)
