"""``CWSConfig``: every knob of the Central Workspace, checked by ``validate``.

The expert pool is configuration: ``experts`` names the experts and ``slots`` gives how many
slots (proposals per token) each contributes, so a Mamba-only or attention-only pool is one
line. ``k_max``, ``k_min``, ``halting``, ``halt_rule``, ``halt_tol``, ``loop``, ``read``,
``compile_step`` and ``cuda_graph`` are read at every forward call, so evaluation may change
them on a built model (compute-quality curves).
"""

from __future__ import annotations

from dataclasses import dataclass

from parallax.config import ModelConfig

EXPERT_NAMES = ("ssm", "attention", "mlp", "siren")
PROBE_KEY_SOURCES = ("ssm", "shift", "tokens")
HALT_RULES = ("first", "second")
LOOPS = ("compact", "reference")
READS = ("absorbed", "projected", "fused", "fused_projected")
FUSED_READS = ("fused", "fused_projected")  # no-grad iterations by a Triton kernel; with gradient, "absorbed"
MAX_DECODER_WINDOW = 16


@dataclass
class CWSConfig(ModelConfig):
    d_model: int = 128  # workspace state h, token embedding and expert proposals
    n_heads: int = 4  # heads of the workspace read (Q, K, V over slots)
    experts: tuple[str, ...] = ("ssm", "attention", "mlp", "siren")
    slots: tuple[int, ...] = (2, 2, 1, 1)  # slots per expert, same order as ``experts``
    # SSM expert (token-clocked)
    ssm_state: int = 16  # N, state size per channel
    ssm_expand: int = 1  # inner channels = ssm_expand * d_model
    ssm_chunk: int = 16  # chunk length of the chunked scan
    # attention probe (h-clocked query, token-clocked keys/values)
    probe_head_dim: int = 32  # one head per slot
    probe_keys: str = "ssm"  # ssm: the SSM read | shift: [x_t, x_{t-1}] | tokens: x_t
    # MLP probe and SIREN prior (h-clocked)
    mlp_hidden: int = 256
    siren_hidden: int = 128
    siren_omega: float = 30.0
    # h-clocked experts read e(h_eff, x): h_eff plus a projection of the token's observation
    # (the pseudo-code's x). Off, they read h_eff alone and iteration K > 1 must recover the
    # token's identity from h_{K-1}, which the no-grad iterations never learn to keep.
    ground: bool = False
    # the inner loop
    decay: float = 0.9
    base: float = 2.0
    k_max: int = 8
    k_min: int = 1
    halting: bool = True
    halt_rule: str = "first"
    halt_tol: float = 0.05
    halt_in_training: bool = False
    live_steps: int = 1
    # how the no-grad halting loop runs (settle.py): "compact" iterates only the tokens still
    # active, so halting saves work; "reference" iterates all and masks the halted (the plain
    # twin it is tested against). Results agree to float rounding.
    loop: str = "compact"
    # how an iteration reads the pool (workspace.py): "projected" computes K and V of every slot,
    # as the pseudo-code says; "absorbed" folds W_k into the query and W_v after the weighted
    # sum, the same values for 2 instead of 2 S d x d products per token (the plain twin is
    # "projected"); "fused" is the absorbed read whose no-grad iterations run the per-token
    # products and the cum / weights update as one Triton kernel on CUDA (ops/fused_read.py;
    # the PyTorch absorbed read where it cannot); "fused_projected" is the projected read whose
    # no-grad iterations compute the h-clocked slots' keys and values as one product and the rest
    # as one Triton kernel, the token-clocked slots' keys and values once per forward (more FLOPs
    # than the absorbed read, fewer bytes where there are fewer h-clocked slots than heads);
    # iterations with gradient run the absorbed read for both fused reads
    read: str = "absorbed"
    # torch.compile the no-grad workspace iterations (the compact loop's whole iteration, monitor
    # included; its working set with dynamic shapes)
    compile_step: bool = False
    # replay every no-grad iteration from CUDA graphs (graphed.py; the compact loop's whole
    # iteration, its working set padded to a few sizes); CUDA only, not under a whole-model
    # torch.compile
    cuda_graph: bool = False
    # motor decoder
    decoder_window: int = 16
    decoder_heads: int = 4
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must divide by n_heads {self.n_heads}")
        if self.d_model % self.decoder_heads or (self.d_model // self.decoder_heads) % 2:
            raise ValueError(
                f"d_model {self.d_model} must divide by decoder_heads {self.decoder_heads} "
                "into an even head dimension (RoPE)"
            )
        if not self.experts:
            raise ValueError("experts must name at least one expert")
        for name in self.experts:
            if name not in EXPERT_NAMES:
                raise ValueError(f"unknown expert {name!r}; choose from {', '.join(EXPERT_NAMES)}")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"experts must not repeat a name, got {list(self.experts)}")
        if len(self.slots) != len(self.experts) or any(s < 1 for s in self.slots):
            raise ValueError(
                f"slots must give a positive count for each of the {len(self.experts)} experts, "
                f"got {list(self.slots)}"
            )
        if self.probe_keys not in PROBE_KEY_SOURCES:
            raise ValueError(
                f"probe_keys must be one of {', '.join(PROBE_KEY_SOURCES)}, got {self.probe_keys!r}"
            )
        if "attention" in self.experts and self.probe_keys == "ssm" and "ssm" not in self.experts:
            raise ValueError("probe_keys='ssm' needs the 'ssm' expert in the pool; use 'shift' or 'tokens'")
        if self.probe_head_dim < 2 or self.probe_head_dim % 2:
            raise ValueError(f"probe_head_dim must be even (RoPE), got {self.probe_head_dim}")
        if min(self.ssm_state, self.ssm_expand, self.ssm_chunk, self.mlp_hidden, self.siren_hidden) < 1:
            raise ValueError("ssm_state, ssm_expand, ssm_chunk, mlp_hidden and siren_hidden must be >= 1")
        if not self.siren_omega > 0 or not self.rope_base > 0:
            raise ValueError(f"siren_omega and rope_base must be positive, got {self.siren_omega} and {self.rope_base}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.base <= 1.0:
            raise ValueError(f"base must be > 1 (weights divide by ln(base)), got {self.base}")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if not 1 <= self.live_steps <= self.k_max:
            raise ValueError(
                f"need 1 <= live_steps <= k_max, got live_steps={self.live_steps}, k_max={self.k_max}"
            )
        if self.halt_rule not in HALT_RULES:
            raise ValueError(f"halt_rule must be one of {', '.join(HALT_RULES)}, got {self.halt_rule!r}")
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {self.loop!r}")
        if self.read not in READS:
            raise ValueError(f"read must be one of {', '.join(READS)}, got {self.read!r}")
        if self.halt_tol <= 0:
            raise ValueError(f"halt_tol must be > 0, got {self.halt_tol}")
        if not 1 <= self.decoder_window <= MAX_DECODER_WINDOW:
            raise ValueError(
                f"decoder_window must be in [1, {MAX_DECODER_WINDOW}], got {self.decoder_window}"
            )
