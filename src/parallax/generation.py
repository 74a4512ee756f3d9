"""Autoregressive decoding of any causal model: batched, on the device, one engine.

``decode_steps`` is the engine. The prompts (B, P) sit in a preallocated (B, P + N) buffer
on the model's device; each step runs the model, samples one token per row on the device
(greedy, or temperature / top-k / top-p with a seeded generator) and writes it to the
buffer's next column. Nothing in the loop waits for the device: end of sequence is a
device-side ``finished`` mask (a finished row keeps emitting ``pad_id``), and the loop only
looks at it where its caller asks to (every ``check_every`` tokens in ``generate_batch``).
Any per-token host synchronisation left is the model's own (e.g. CWS halting) or the
caller's: streaming text must read each token, so it is a callback (``on_token``) or the
batch-1 iterator ``generate``.

A model with ``new_cache(batch, max_len)`` is run incrementally: the prompt once, then one
token per step through its cache (KV caches for transformer / swap / recurrent, token-clocked
state plus decoder KV caches for cws). Any other model is run on the whole sequence each
step. Both see the same context, so greedy decoding gives the same tokens either way. Once
the sequence is longer than the model's context (``max_seq_len`` or ``block_size`` of its
config), the oldest tokens are dropped and the window is recomputed each step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from parallax.errors import ParallaxError
from parallax.models.cast_weights import CastWeights, autocast_weights
from parallax.models.graph_step import graph_step, uncached_autocast
from parallax.models.output import ModelOutput

DEFAULT_CHECK_EVERY = 16  # generate_batch looks at the `finished` mask (one host sync) this often


@dataclass(frozen=True)
class SampledToken:
    """One generated token; ``k`` is the iterations the model spent on it, when it says."""

    id: int
    k: int | None


@dataclass(frozen=True)
class Generation:
    """The result of ``generate_batch``, on the model's device.

    ``ids`` (B, P + n): the prompts, then the n generated tokens (n <= max_new_tokens: fewer
    when every row had stopped at a check); after a row's ``stop_id`` it holds ``pad_id``.
    ``k`` (B, n): iterations per generated token when the model reports them (``k_used``).
    ``finished`` (B,): the rows that produced ``stop_id``.
    """

    ids: Tensor
    k: Tensor | None
    finished: Tensor
    prompt_len: int

    @property
    def new_ids(self) -> Tensor:
        """The generated tokens (B, n)."""
        return self.ids[:, self.prompt_len :]


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
    """Next token ids (B,) from last-position logits (B, V); argmax when temperature is 0.

    A draw from softmax(logits / T) as argmax(p / E) with E ~ Exp(1) i.i.d. (the exponential
    race, equivalent to ``multinomial``), which needs no host-side validation of ``p``.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    race = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1.0, generator=generator)
    return race_sample(logits, temperature, top_k, top_p, race)


def race_sample(logits: Tensor, temperature: float, top_k: int, top_p: float, race: Tensor) -> Tensor:
    """``sample_next`` with its noise given (a CUDA graph draws it outside, see ``GraphedStep``)."""
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return (probs / race).argmax(dim=-1)


def prompt_tensor(prompts: Tensor | Sequence[int] | Sequence[Sequence[int]], device) -> Tensor:
    """Prompts as a (B, P) long tensor on ``device``: one list of ids is a batch of one; the
    rows of a batch must be equally long (the models take no padding mask)."""
    if isinstance(prompts, Tensor):
        ids = prompts if prompts.dim() == 2 else prompts.reshape(1, -1)
        return ids.to(device=device, dtype=torch.long)
    rows = [list(prompts)] if not prompts or not isinstance(prompts[0], Sequence) else [list(r) for r in prompts]
    if len({len(r) for r in rows}) > 1:
        raise ParallaxError(
            f"the prompts have different lengths ({', '.join(str(len(r)) for r in rows)}); "
            "a batch needs prompts of one length"
        )
    return torch.tensor(rows, dtype=torch.long, device=device)


def check_request(
    model: torch.nn.Module, prompt_len: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float
) -> None:
    """Clear errors for an empty prompt, one longer than the context, or bad sampling knobs."""
    context = context_length(model)
    if prompt_len == 0:
        raise ParallaxError("the prompt is empty; give at least one token of text")
    if context is not None and prompt_len > context:
        raise ParallaxError(f"the prompt is {prompt_len} tokens long, more than the model's context of {context}")
    if max_new_tokens < 0 or temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ParallaxError("max_new_tokens, temperature and top_k must be >= 0, and top_p in (0, 1]")


class GraphedStep:
    """One decoding step, the model on the last sampled tokens and the sampling, captured as
    a CUDA graph over a static cache (``new_cache(..., static=True)``): a replay costs the
    host one launch where the eager step launches hundreds of kernels (thousands for the CWS's
    K iterations), which is what bounds eager decoding at small batch.

    ``warm_up`` runs a step eagerly on the stream the capture will use and in the same mode
    (``graph_mode``), so cuBLAS handles, Triton and compiled kernels exist before ``capture``.
    The race's noise is drawn before each replay from the caller's generator, outside the
    graph, so a graphed step samples the same tokens as an eager one with the same seed.
    Under autocast the graph reads the model's Linear weights cast once, when the step is
    made (``cast_weights.py``), not cast again at every token: a bf16 copy of those weights
    held for the generation, which does not see the weights change in place meanwhile.
    """

    def __init__(self, model: torch.nn.Module, cache, sampling: tuple[float, int, float]):
        self.model, self.cache, self.sampling = model, cache, sampling
        self.device = next(model.parameters()).device
        self.casts = autocast_weights([model], self.device.type)
        self.stream = torch.cuda.Stream(self.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def warm_up(self, tokens: Tensor) -> ModelOutput:
        """The model's output for the last tokens (B, 1), run eagerly as the capture will run
        it: on its stream, in its mode, from the buffer every replay reads (so a compiled
        model sees the same input strides)."""
        self.token = tokens.clone()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream), graph_mode(self.device, self.casts):
            out = self.model(self.token, cache=self.cache)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        logits = out.logits[:, -1]  # the race's noise, if any, is drawn per logit
        self.race = torch.empty(logits.shape, dtype=torch.float32, device=logits.device) if self.sampling[0] else None
        return out

    def capture(self) -> None:
        """Capture the step ``warm_up`` ran."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, stream=self.stream), \
                graph_mode(self.device, self.casts):
            self.next, self.k = self.step()

    def step(self) -> tuple[Tensor, Tensor | None]:
        """What the graph holds: the next tokens (B,) and their K from ``self.token``."""
        out = self.model(self.token, cache=self.cache)
        last = out.logits[:, -1]
        tokens = race_sample(last, *self.sampling, self.race) if self.sampling[0] else last.argmax(dim=-1)
        k_used = out.diagnostics.get("k_used")
        return tokens, k_used[:, -1].to(torch.long) if k_used is not None else None

    def __call__(self, token: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """The next tokens (B,) and their K after ``token`` (B, 1), in tensors of their own."""
        self.token.copy_(token)
        if self.race is not None:
            self.race.exponential_(1.0, generator=generator)
        self.graph.replay()
        return self.next.clone(), None if self.k is None else self.k.clone()


@contextlib.contextmanager
def graph_mode(device: torch.device, casts: CastWeights | None = None) -> Iterator[None]:
    """A step of a CUDA graph (``graph_step``) under ``uncached_autocast``, reading the weight
    ``casts`` where given."""
    with graph_step(), uncached_autocast(device.type), casts.swapped() if casts else contextlib.nullcontext():
        yield


def check_graphable(model: torch.nn.Module) -> None:
    """A clear error where a decoding step cannot be captured as a CUDA graph."""
    if not hasattr(model, "new_cache"):
        raise ParallaxError(f"{type(model).__name__} decodes without a cache; CUDA graphs need an incremental model")
    if next(model.parameters()).device.type != "cuda":
        raise ParallaxError("CUDA graphs need the model on a CUDA device")


@torch.no_grad()
def decode_steps(
    model: torch.nn.Module,
    ids: Tensor,
    prompt_len: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
    stop_id: int | None = None,
    pad_id: int | None = None,
    cuda_graph: bool = False,
) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """The engine. ``ids`` (B, prompt_len + N) holds the prompts in its first ``prompt_len``
    columns; step i writes the sampled tokens to column ``prompt_len + i`` and yields
    (tokens (B,), k (B,) long or None, finished (B,) bool), all on the device.

    A row that has produced ``stop_id`` is finished and emits ``pad_id`` (default
    ``stop_id``) from then on. Nothing here reads a device value on the host.

    ``cuda_graph``: the prompt and the first new token run eagerly (the second on a side
    stream, which warms it up), then each token is one replay of a ``GraphedStep`` (the
    capture, once per call, waits for the device). A CWS with halting then runs the masked
    loop to k_max (no early exit, which would wait for the device).
    """
    batch, total = ids.shape
    context = context_length(model)
    if cuda_graph:
        check_graphable(model)
    cache = None
    if hasattr(model, "new_cache"):
        cache = model.new_cache(batch, min(total, context or total), **({"static": True} if cuda_graph else {}))
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    pad = stop_id if pad_id is None else pad_id
    seen = 0  # columns of `ids` the cache holds
    graphed: GraphedStep | None = None
    for t in range(prompt_len, total):  # t: tokens in the sequence before this step
        k_used = None
        if graphed is not None and t <= (context or t):
            token, k_used = graphed(ids[:, t - 1 : t], generator)
        else:
            if cache is not None and t <= (context or t):
                if cuda_graph and t == prompt_len + 1:
                    graphed = GraphedStep(model, cache, (temperature, top_k, top_p))
                    out = graphed.warm_up(ids[:, seen:t])
                    graphed.capture()
                else:
                    out = model(ids[:, seen:t], cache=cache)
                seen = t
            else:  # past the context: drop the oldest tokens and recompute the window
                cache = graphed = None
                out = model(ids[:, max(0, t - context) if context else 0 : t])
            token = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)
            if "k_used" in out.diagnostics:
                k_used = out.diagnostics["k_used"][:, -1].to(torch.long)
        if stop_id is not None:
            token = token.masked_fill(finished, pad)
            finished = finished | (token == stop_id)
        ids[:, t] = token
        yield token, k_used, finished


def generate_batch(
    model: torch.nn.Module,
    prompts: Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_id: int | None = None,
    pad_id: int | None = None,
    on_token: Callable[[int, Tensor, Tensor | None, Tensor], bool | None] | None = None,
    check_every: int = DEFAULT_CHECK_EVERY,
    cuda_graph: bool = False,
) -> Generation:
    """Continue each row of ``prompts`` (B, P) by up to ``max_new_tokens`` tokens.

    With ``stop_id``, decoding ends early once every row has produced it, which is looked at
    every ``check_every`` tokens (one host sync each; 0 never looks). ``on_token(step,
    tokens, k, finished)`` is called after each step with the device tensors of
    ``decode_steps``; reading them is the caller's sync, and returning True ends decoding
    (a streaming caller knows when its rows are done). The same seed gives the same tokens on
    the same device. ``cuda_graph``: each token after the first two is one CUDA graph replay
    (``decode_steps``).
    """
    device = next(model.parameters()).device
    prompt = prompt_tensor(prompts, device)
    check_request(model, prompt.shape[1], max_new_tokens, temperature, top_k, top_p)
    batch, prompt_len = prompt.shape
    ids = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.long, device=device)
    ids[:, :prompt_len] = prompt
    k_out = None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    steps = decode_steps(model, ids, prompt_len, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator, stop_id=stop_id, pad_id=pad_id, cuda_graph=cuda_graph)
    produced = 0
    for step, (token, k, finished) in enumerate(steps):
        produced = step + 1
        if k is not None:
            if k_out is None:
                k_out = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
            k_out[:, step] = k
        if on_token is not None and on_token(step, token, k, finished):
            break
        if stop_id is not None and check_every > 0 and produced % check_every == 0 and bool(finished.all()):
            break
    return Generation(
        ids=ids[:, : prompt_len + produced],
        k=k_out[:, :produced] if k_out is not None else None,
        finished=finished,
        prompt_len=prompt_len,
    )


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
    cuda_graph: bool = False,
) -> Iterator[SampledToken]:
    """Yield up to ``max_new_tokens`` tokens continuing one ``prompt`` (token ids), stopping
    after ``stop_id`` if given: the streaming form of ``generate_batch`` at batch 1, which
    reads each token on the host (one sync per token). The same seed gives the same tokens
    as ``generate_batch`` on the same device; ``cuda_graph`` as there."""
    check_request(model, len(prompt), max_new_tokens, temperature, top_k, top_p)
    return _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_id, cuda_graph)



def first_row(token: Tensor, k: Tensor | None) -> SampledToken:
    """Row 0's token and K read to the host in one transfer (the per-token sync of streaming)."""
    host = (torch.stack([token, k]) if k is not None else token[None])[:, 0].tolist()
    return SampledToken(host[0], host[1] if k is not None else None)

def _stream(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    stop_id: int | None,
    cuda_graph: bool,
) -> Iterator[SampledToken]:
    device = next(model.parameters()).device
    ids = torch.empty(1, len(prompt) + max_new_tokens, dtype=torch.long, device=device)
    ids[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    steps = decode_steps(model, ids, len(prompt), temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator, stop_id=stop_id, cuda_graph=cuda_graph)
    for token, k, _ in steps:
        sampled = first_row(token, k)
        yield sampled
        if sampled.id == stop_id:
            return
