"""Autoregressive sampling from any causal model, one token at a time.

A model with ``new_cache(batch, max_len)`` is run incrementally: the prompt once, then one
token per step. Any other model is run on the whole sequence each step. Both paths see the
same context, so greedy decoding gives the same tokens either way. Once the sequence is
longer than the model's context (``max_seq_len`` or ``block_size`` of its config), the
oldest tokens are dropped and the window is recomputed each step.

Sampling happens on the model's device; the only host transfer per step is the one that
hands the new token (and its K) to the caller, which streaming needs anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from parallax.errors import ParallaxError


@dataclass(frozen=True)
class SampledToken:
    """One generated token; ``k`` is the iterations the model spent on it, when it says."""

    id: int
    k: int | None


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None when it sets no limit."""
    cfg = getattr(model, "config", None)
    limits = [getattr(cfg, name, 0) or 0 for name in ("max_seq_len", "block_size")]
    positive = [n for n in limits if n > 0]
    return min(positive) if positive else None


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the ``top_k`` largest logits, then the smallest set whose probability reaches
    ``top_p``; the rest become -inf. ``logits`` is (B, V); 0 and 1.0 disable each filter."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V); argmax when temperature is 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _step(model: torch.nn.Module, ids: Tensor, cache) -> tuple[Tensor, Tensor | None]:
    """Logits (1, V) at the last position of ``ids`` (1, t), and that position's K (1,)."""
    out = model(ids, cache=cache) if cache is not None else model(ids)
    k_used = out.diagnostics.get("k_used")
    return out.logits[:, -1], (k_used[:, -1] if k_used is not None else None)


def generate(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_id: int | None = None,
) -> Iterator[SampledToken]:
    """Yield up to ``max_new_tokens`` tokens continuing ``prompt`` (token ids), stopping
    after ``stop_id`` if given. The same seed gives the same tokens on the same device."""
    context = context_length(model)
    if not prompt:
        raise ParallaxError("the prompt is empty; give at least one token of text")
    if context is not None and len(prompt) > context:
        raise ParallaxError(f"the prompt is {len(prompt)} tokens long, more than the model's context of {context}")
    if max_new_tokens < 0 or temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ParallaxError("max_new_tokens, temperature and top_k must be >= 0, and top_p in (0, 1]")
    return _generate(model, prompt, max_new_tokens, context, temperature, top_k, top_p, seed, stop_id)


def _generate(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    context: int | None,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    stop_id: int | None,
) -> Iterator[SampledToken]:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, L)
    cache = None
    if hasattr(model, "new_cache"):
        cache = model.new_cache(1, min(len(prompt) + max_new_tokens, context or len(prompt) + max_new_tokens))
    fresh = ids  # the tokens the cache has not seen yet
    for _ in range(max_new_tokens):
        if cache is not None and ids.shape[1] <= (context or ids.shape[1]):
            logits, k = _step(model, fresh, cache)
        else:
            cache = None
            logits, k = _step(model, ids[:, -context:] if context else ids, None)
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (1,)
        values = torch.stack([token, k.to(token.dtype)]) if k is not None else token[None]
        host = values[:, 0].tolist()
        yield SampledToken(host[0], host[1] if k is not None else None)
        if host[0] == stop_id:
            return
        fresh = token[:, None]
        ids = torch.cat([ids, fresh], dim=1)
