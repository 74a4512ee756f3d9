"""The expert pool built from config, and its two clocks.

``token_clocked`` runs once per forward over the new tokens: the SSM scan, the attention
probe's keys/values, and the observation that starts the workspace. ``forward`` runs every
iteration: it asks each h-clocked expert for its slots given h_eff, and returns every
expert's slots, each RMS-normalised, as (B, T, S_total, d): the token-clocked experts' first
(normalised once per forward, in ``token_clocked``, not at every iteration), then the
h-clocked ones, each group in the configured order. The workspace is permutation-invariant
over slots, so the order only has to be the same at every iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from parallax.models.cws.config import CWSConfig
from parallax.models.cws.experts import AttentionProbe, MLPProbe, SirenPrior, SSMExpert
from parallax.models.layers import KVCache, RMSNorm


@dataclass
class TokenContext:
    """What the token-clocked pass leaves for the iterations over positions [start, start+T).

    ``observation`` (B, T, d) is the token's own reading (embedding, plus the SSM read when
    the pool has an SSM); ``fixed`` holds token-clocked slots (B, T, S, d), normalised, by
    expert name;
    ``probe_kv`` the attention probe's keys and values (B, S, L, dh) for L = start + T, or with
    a static cache (for CUDA graphs in incremental decoding) its whole buffers (L = max_len), with
    ``probe_start`` the first token's position as a 0-dim device tensor (see ``AttentionProbe``);
    ``grounding`` (B, T, d) what the h-clocked experts add to h_eff (``CWSConfig.ground``);
    ``fixed_kv`` (B, T, S_f, 2 d) the workspace's keys and values of the ``fixed`` slots, for the
    read that projects them; ``input_weight`` (d + sum of widths, d) the workspace's W_q stacked on
    the input layers of the h-clocked experts, for the fused reads' one product of h_eff per
    iteration (both from ``Workspace.prepare``).

    ``select`` gives the context of a subset of the tokens (the compact loop's working set):
    per-token tensors become (1, N, ...) rows, ``rows`` (N,) holds their flat indices into
    the (B, T) grid of ``grid``, and ``probe_kv`` stays per sequence (``input_weight`` shared).
    """

    observation: Tensor
    grounding: Tensor | None = None
    fixed: dict[str, Tensor] = field(default_factory=dict)
    fixed_kv: Tensor | None = None
    input_weight: Tensor | None = None
    probe_kv: tuple[Tensor, Tensor] | None = None
    probe_start: Tensor | None = None
    rows: Tensor | None = None
    grid: tuple[int, int] | None = None

    def token_clocked_slots(self) -> Tensor | None:
        """The ``fixed`` slots as one (..., S_f, d) tensor, in the pool's order (no copy when one
        expert gives them all), or None."""
        fixed = list(self.fixed.values())
        return fixed[0] if len(fixed) == 1 else torch.cat(fixed, dim=2) if fixed else None

    def select(self, rows: Tensor) -> "TokenContext":
        """The context of the tokens at flat indices ``rows`` (N,) of this full context."""

        def pick(x: Tensor) -> Tensor:
            return x.flatten(0, 1)[rows].unsqueeze(0)

        return TokenContext(
            observation=pick(self.observation),
            grounding=None if self.grounding is None else pick(self.grounding),
            fixed={name: pick(x) for name, x in self.fixed.items()},
            fixed_kv=None if self.fixed_kv is None else pick(self.fixed_kv),
            input_weight=self.input_weight,
            probe_kv=self.probe_kv,
            probe_start=self.probe_start,
            rows=rows,
            grid=tuple(self.observation.shape[:2]),
        )


@dataclass
class PoolCache:
    """Token-clocked state carried between incremental calls."""

    ssm_state: Tensor | None
    last_embedding: Tensor  # (B, 1, d): x_{t-1} for the token-shift key source
    probe: KVCache | None


class ExpertPool(nn.Module):
    def __init__(self, cfg: CWSConfig):
        super().__init__()
        d = cfg.d_model
        self.dim = d
        self.slots = tuple(cfg.slots)
        self.probe_keys = cfg.probe_keys
        experts: dict[str, nn.Module] = {}
        for name, slots in zip(cfg.experts, cfg.slots):
            if name == "ssm":
                experts[name] = SSMExpert(d, slots, cfg.ssm_state, cfg.ssm_expand, cfg.ssm_chunk)
            elif name == "attention":
                source_dim = 2 * d if cfg.probe_keys == "shift" else d
                experts[name] = AttentionProbe(d, slots, cfg.probe_head_dim, source_dim, cfg.rope_base)
            elif name == "mlp":
                experts[name] = MLPProbe(d, slots, cfg.mlp_hidden)
            else:
                experts[name] = SirenPrior(d, slots, cfg.siren_hidden, cfg.siren_omega)
        self.experts = nn.ModuleDict(experts)
        self.norm = RMSNorm(d, cfg.norm_eps)  # of every slot (the workspace's pseudo-code: pool = RMSNorm(...))
        h_clocked = any(name != "ssm" for name in cfg.experts)
        self.ground = (
            nn.Sequential(RMSNorm(d, cfg.norm_eps), nn.Linear(d, d, bias=False))
            if cfg.ground and h_clocked else None
        )

    @property
    def total_slots(self) -> int:
        return sum(self.slots)

    def h_clocked_experts(self) -> list[nn.Module]:
        """The experts that run at every workspace iteration (all but the token-clocked SSM)."""
        return [expert for name, expert in self.experts.items() if name != "ssm"]

    def reset_expert_parameters(self) -> None:
        """Re-apply the experts' own inits (after a model-wide ``init_weights``)."""
        for expert in self.experts.values():
            if isinstance(expert, (SSMExpert, SirenPrior)):
                expert.reset_expert_parameters()

    def new_cache(self, batch: int, max_len: int, device, dtype, static: bool = False) -> PoolCache:
        ssm = self.experts["ssm"] if "ssm" in self.experts else None
        probe = self.experts["attention"] if "attention" in self.experts else None
        return PoolCache(
            ssm_state=None if ssm is None else torch.zeros(
                batch, ssm.A_log.shape[0], ssm.A_log.shape[1], device=device, dtype=dtype
            ),
            last_embedding=torch.zeros(batch, 1, self.dim, device=device, dtype=dtype),
            probe=None if probe is None else probe.new_cache(batch, max_len, device, dtype, static),
        )

    def token_clocked(self, x: Tensor, cache: PoolCache | None) -> TokenContext:
        """One context update over the new token embeddings x (B, T, d). The cache's state is
        updated in place (a CUDA graph of a decoding step reads and writes it where it is);
        with a static cache the context has the same shapes at every position."""
        context = TokenContext(observation=x)
        read = None
        if "ssm" in self.experts:
            ssm = self.experts["ssm"]
            read, state = ssm.read(x, cache.ssm_state if cache is not None else None)
            context.fixed["ssm"] = self.norm(ssm.proposals(read))
            context.observation = x + read
            if cache is not None:
                cache.ssm_state.copy_(state)
        if "attention" in self.experts:
            if self.probe_keys == "ssm":
                source = read
            elif self.probe_keys == "shift":
                first = cache.last_embedding if cache is not None else torch.zeros_like(x[:, :1])
                source = torch.cat([x, torch.cat([first, x[:, :-1]], dim=1)], dim=-1)
            else:
                source = x
            keys, values, context.probe_start = self.experts["attention"].keys_values(
                source, cache.probe if cache is not None else None
            )
            context.probe_kv = (keys, values)
        if cache is not None:
            cache.last_embedding.copy_(x[:, -1:])
        if self.ground is not None:
            context.grounding = self.ground(context.observation)
        return context

    def forward(self, h_eff: Tensor, context: TokenContext) -> Tensor:
        """Every expert's slots for state h_eff (B, T, d), or (1, N, d) for the tokens of a
        ``TokenContext.select``: (B, T, S_total, d) or (1, N, S_total, d), normalised."""
        return torch.cat([group for group in self.slot_groups(h_eff, context) if group is not None], dim=2)

    def input_layers(self) -> list[nn.Linear]:
        """The h-clocked experts' first layers, each a product of h_eff, in ``slot_groups``' order."""
        return [expert.input_layer for expert in self.h_clocked_experts()]

    def slot_groups(
        self, h_eff: Tensor, context: TokenContext, inputs: list[Tensor] | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """``forward``'s slots in two groups, (token-clocked, h-clocked), None where the pool
        has no expert of that kind: a reader that takes both (the fused read) saves the copy of
        the token-clocked slots into the concatenation at every iteration. ``inputs``, if given,
        are the products of h_eff with the ``input_layers``' weights (no bias), computed by the
        caller (``Workspace._fused_step``, one product with the weights ``Workspace.prepare``
        stacks); not with grounding, which the experts add to h_eff before their first layers."""
        if inputs is not None and context.grounding is not None:
            raise ValueError("the experts' first-layer products cannot be given with grounding: they read h_eff + grounding")
        token_clocked = context.token_clocked_slots()
        if context.grounding is not None:
            h_eff = h_eff + context.grounding
        inputs = iter(inputs or [None] * len(self.experts))
        proposals = []
        for name, expert in self.experts.items():
            if name in context.fixed:
                continue
            if name == "attention":
                proposals.append(expert(
                    h_eff, *context.probe_kv, context.rows, context.grid, context.probe_start, projected=next(inputs)
                ))
            else:
                proposals.append(expert(h_eff, projected=next(inputs)))
        h_clocked = self.norm(torch.cat(proposals, dim=2)) if proposals else None
        return token_clocked, h_clocked
