"""Generation contracts: one batched engine for every causal model; batched == per row,
cached == uncached greedy decoding, per-row end of sequence, seeded sampling, no host sync
in the decode loop, clear errors, and `parallax generate` on top of it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallax.errors import ParallaxError
from parallax.generation import GraphedStep, filter_logits, generate, generate_batch, graph_mode
from parallax.models.cast_weights import autocast_weights
from parallax.models.layers import KVCache, attention_mask
from parallax.models.cws import CWS, CWSConfig
from parallax.models.recurrent import RecurrentConfig, RecurrentDepthTransformer
from parallax.models.swap import SwapConfig, SwapTransformer
from parallax.models.transformer import Transformer, TransformerConfig

V = 53
pytestmark = pytest.mark.usefixtures("one_thread")


def spread(model, only=("",), std=0.3):
    """Random weights large enough that greedy decoding does not repeat one token (the CWS
    only its embedding and decoder: large random SSM and SIREN weights make it chaotic)."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if name.startswith(only):
            torch.nn.init.normal_(p, std=std)
    return model.eval()


class Uncached(torch.nn.Module):
    """The same model without ``new_cache``, so the sampler recomputes every step."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, ids):
        return self.model(ids)


def cws(**knobs):
    cfg = CWSConfig(vocab_size=V, max_seq_len=12, d_model=32, n_heads=2, decoder_heads=2, probe_head_dim=8,
                    mlp_hidden=32, siren_hidden=32, ssm_state=4, ssm_chunk=4, k_max=6, decoder_window=4,
                    halt_tol=0.6, **knobs)
    torch.manual_seed(0)
    return spread(CWS(cfg), only=("embed", "decoder"), std=3.0)


MODELS = {
    "transformer": lambda: spread(Transformer(TransformerConfig(vocab_size=V, d_model=32, n_kv_heads=2, max_seq_len=12))),
    "swap": lambda: spread(SwapTransformer(SwapConfig(vocab_size=V, n_embd=32, n_layer=2, block_size=12))),
    "recurrent": lambda: spread(RecurrentDepthTransformer(RecurrentConfig(
        vocab_size=V, d_model=32, n_heads=2, max_seq_len=12, test_iterations=3))),
    "cws": cws,
}
PROMPTS = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2], [9, 9, 8, 7, 0]]


def ids_of(tokens):
    return [t.id for t in tokens]


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_greedy_equals_uncached_past_the_context(name):
    model = MODELS[name]()
    prompt = PROMPTS[0]
    cached = ids_of(generate(model, prompt, 14, temperature=0))  # 19 > context 12
    plain = ids_of(generate(Uncached(model), prompt, 14, temperature=0))
    assert cached == plain and len(set(cached)) > 2


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_greedy_equals_each_row_alone(name):
    model = MODELS[name]()
    batch = generate_batch(model, PROMPTS, 10, temperature=0)  # 15 > context 12: the window path too
    assert batch.ids.shape == (3, 15) and batch.ids[:, :5].tolist() == PROMPTS
    for row, prompt in enumerate(PROMPTS):
        alone = generate_batch(model, prompt, 10, temperature=0)
        assert batch.new_ids[row].tolist() == alone.new_ids[0].tolist()
        streamed = list(generate(model, prompt, 10, temperature=0))
        assert alone.new_ids[0].tolist() == ids_of(streamed)
        if batch.k is not None:  # recurrent and cws report K per token
            assert batch.k[row].tolist() == alone.k[0].tolist() == [t.k for t in streamed]
    assert (batch.k is not None) == (name in ("recurrent", "cws"))
    assert len(set(batch.new_ids.flatten().tolist())) > 3


def test_cws_halting_k_per_token_in_a_batch():
    model = cws(halting=True)
    batch = generate_batch(model, PROMPTS, 6, temperature=0)
    assert batch.k.shape == (3, 6) and len(batch.k.unique()) > 1
    for row, prompt in enumerate(PROMPTS):
        assert batch.k[row].tolist() == [t.k for t in generate(model, prompt, 6, temperature=0)]


def test_seeded_sampling_is_deterministic_and_stops():
    model = MODELS["transformer"]()
    run = lambda seed: ids_of(generate(model, [1, 2], 10, temperature=1.0, top_k=5, top_p=0.9, seed=seed))
    assert run(0) == run(0) and run(0) != run(1)
    first = run(0)[0]
    assert ids_of(generate(model, [1, 2], 10, temperature=1.0, top_k=5, top_p=0.9, stop_id=first)) == [first]
    batched = generate_batch(model, [1, 2], 10, temperature=1.0, top_k=5, top_p=0.9, seed=0)
    assert batched.new_ids[0].tolist() == run(0)  # the streaming form draws the same tokens


def test_batched_sampling_is_deterministic_for_a_seed():
    model = MODELS["swap"]()
    draw = lambda seed: generate_batch(model, PROMPTS, 8, temperature=1.2, top_k=10, seed=seed).new_ids
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    rows = draw(3)
    assert not torch.equal(rows[0], rows[1])  # rows draw from their own distributions


def test_end_of_sequence_per_row():
    model = MODELS["transformer"]()
    free = generate_batch(model, PROMPTS, 8, temperature=0).new_ids.tolist()
    # a token row 0 produces, that some other row never does within 8 tokens
    stop = next(t for t in free[0][1:] if any(t not in row for row in free[1:]))
    pad = V - 1
    out = generate_batch(model, PROMPTS, 8, temperature=0, stop_id=stop, pad_id=pad, check_every=0)
    expected = [row[: row.index(stop) + 1] + [pad] * (7 - row.index(stop)) if stop in row else row for row in free]
    assert out.new_ids.tolist() == expected
    assert out.finished.tolist() == [stop in row for row in free] and not out.finished.all()
    # once every row has finished, a check ends decoding: here row 0 alone, checked each token
    alone = generate_batch(model, PROMPTS[0], 8, temperature=0, stop_id=stop, check_every=1)
    assert alone.new_ids[0].tolist() == free[0][: free[0].index(stop) + 1] and alone.finished.all()


def test_on_token_streams_and_can_stop():
    model = MODELS["recurrent"]()
    seen = []

    def on_token(step, token, k, finished):
        seen.append((step, token.tolist(), k.tolist()))
        return step == 3

    out = generate_batch(model, PROMPTS, 6, temperature=0, on_token=on_token)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and out.new_ids.shape == (3, 4)
    assert [s[1] for s in seen] == out.new_ids.T.tolist() and [s[2] for s in seen] == out.k.T.tolist()


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts, by name, the calls of every Tensor method that reads a device value on the host."""
    calls = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_loop_reads_nothing_on_the_host(name, host_reads):
    model = MODELS[name]() if name != "cws" else cws(halting=False)  # CWS halting syncs in the model
    prompts = torch.tensor(PROMPTS)
    generate_batch(model, prompts, 6, temperature=0.9, top_k=8, top_p=0.9)
    generate_batch(model, prompts, 6, temperature=0, stop_id=0, check_every=0)
    assert host_reads == []
    generate_batch(model, prompts, 6, temperature=0, stop_id=V + 1, check_every=3)  # a stop never drawn
    assert host_reads == ["__bool__", "__bool__"]  # one look at `finished` every 3 tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(MODELS))
def test_decode_loop_does_not_synchronise_cuda(name):
    model = (MODELS[name]() if name != "cws" else cws(halting=False)).cuda()
    prompts = torch.tensor(PROMPTS, device="cuda")
    generate_batch(model, prompts, 2, temperature=0.9, top_k=8, top_p=0.9)  # warm-up: lazy initialisation
    torch.cuda.set_sync_debug_mode("error")
    try:
        generate_batch(model, prompts, 6, temperature=0.9, top_k=8, top_p=0.9, stop_id=0, check_every=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


STEP_MODELS = {
    **MODELS,  # the CWS halting (its default)
    "cws_halting_off": lambda: cws(halting=False),
    "cws_shift_keys_grounded": lambda: cws(probe_keys="shift", ground=True),
    "cws_iteration_graphs": lambda: cws(cuda_graph=True),
    "recurrent_moe": lambda: spread(RecurrentDepthTransformer(RecurrentConfig(
        vocab_size=V, d_model=32, n_heads=2, n_kv_heads=1, max_seq_len=12, test_iterations=2, window=3,
        moe_experts=3, moe_top_k=2))),
}


@pytest.mark.parametrize("name", [n for n in STEP_MODELS if n != "cws_iteration_graphs"])  # its caches are static
def test_static_cache_decodes_as_the_growing_one(name):
    """A static cache (whole buffers, device positions, masks: what a CUDA graph of a step
    needs) gives the logits of the cache that grows by slices, prompt and each new token."""
    model = STEP_MODELS[name]().double()  # fp64: the two attend over different lengths, so round differently
    ids = torch.tensor([PROMPTS[0] + [2, 6, 0, 4, 4, 1]] * 2)
    logits = {}
    with torch.no_grad():
        for static in (False, True):
            cache = model.new_cache(2, 12, static=static)
            steps = [model(ids[:, :5], cache=cache).logits]  # then chunks of 1, 3 and 2 tokens
            steps += [model(ids[:, a:b], cache=cache).logits for a, b in ((5, 6), (6, 9), (9, 11))]
            logits[static] = torch.cat(steps, dim=1)
            positions = [int(c.position) for c in kv_caches(cache) if c.position is not None]
            assert positions == ([ids.shape[1]] * len(positions) if static else []) and len(kv_caches(cache)) > 0
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-10, atol=1e-10)
    assert logits[True].shape == (2, 11, V)


def kv_caches(cache) -> list[KVCache]:
    """Every ``KVCache`` in a model's cache."""
    return [owner for owner, name in cache_fields(cache) if isinstance(owner, KVCache) and name == "k"]


def cache_fields(obj) -> list[tuple[object, str]]:
    """(owner, name) of every tensor and int a model's cache holds, at any depth."""
    if isinstance(obj, list):
        return [f for x in obj for f in cache_fields(x)]
    if isinstance(obj, torch.Tensor) or not hasattr(obj, "__dict__"):
        return []
    fields = []
    for name, x in vars(obj).items():
        plain = isinstance(x, (torch.Tensor, int)) and not isinstance(x, bool)
        fields += [(obj, name)] if plain else cache_fields(x)
    return fields


class NoHostReads(TorchDispatchMode):
    """Fails on the operators that read a device value on the host (a CUDA capture refuses
    them; on the CPU they would pass unseen)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
            raise AssertionError(f"{func} reads a device value on the host in a graph step")
        return func(*args, **(kwargs or {}))


class EmulatedGraphedStep(GraphedStep):
    """``GraphedStep`` on the CPU, behaving as a CUDA graph does: the capture runs the step's
    Python once, reading nothing on the host, and no kernel (the cache's tensors are put back,
    and must not have been rebound); a replay runs the kernels with the host-side ints the
    capture saw (the cache's ints are set to them for the step, then back). Decoding through
    it equals eager decoding only if nothing in the step depends on host state that a replay
    would not update."""

    replays = 0

    def __init__(self, model, cache, sampling):
        self.model, self.cache, self.sampling = model, cache, sampling
        self.casts = autocast_weights([model], "cpu")

    def warm_up(self, tokens):
        self.token = tokens.clone()
        with graph_mode(tokens.device, self.casts):
            out = self.model(self.token, cache=self.cache)
        self.race = torch.empty(out.logits[:, -1].shape) if self.sampling[0] else None
        return out

    def capture(self):
        fields = cache_fields(self.cache)
        tensors = [(o, n, getattr(o, n).clone(), getattr(o, n).data_ptr())
                   for o, n in fields if isinstance(getattr(o, n), torch.Tensor)]
        self.seen = self.ints()  # what the captured Python read
        with graph_mode(self.token.device, self.casts), NoHostReads():
            self.step()
        assert cache_fields(self.cache) == fields, "the step added or removed cache fields"
        for owner, name, before, address in tensors:
            assert getattr(owner, name).data_ptr() == address, f"{type(owner).__name__}.{name} rebound in the step"
            getattr(owner, name).copy_(before)

    def ints(self):
        return [(o, n, getattr(o, n)) for o, n in cache_fields(self.cache) if isinstance(getattr(o, n), int)]

    def __call__(self, token, generator):
        EmulatedGraphedStep.replays += 1
        self.token.copy_(token)
        if self.race is not None:
            self.race.exponential_(1.0, generator=generator)
        now = self.ints()
        for owner, name, value in self.seen:
            setattr(owner, name, value)
        with graph_mode(token.device, self.casts):
            tokens, k = self.step()
        for owner, name, value in now:
            setattr(owner, name, value)
        return tokens, k


@pytest.mark.parametrize("name", list(STEP_MODELS))
def test_emulated_graph_decoding_equals_eager(name, monkeypatch):
    """The engine's graph path on the CPU (``EmulatedGraphedStep``): the prompt, the warm-up,
    the capture, replays, past the context the window recomputed; greedy, sampled, with a
    stop: the eager tokens, K and finished rows."""
    import parallax.generation as generation

    monkeypatch.setattr(generation, "GraphedStep", EmulatedGraphedStep)
    monkeypatch.setattr(generation, "check_graphable", lambda model: None)
    model = STEP_MODELS[name]()
    for knobs in (dict(temperature=0), dict(temperature=0.9, top_k=8, top_p=0.9, seed=3, stop_id=4)):
        replays = EmulatedGraphedStep.replays
        eager = generate_batch(model, PROMPTS, 10, **knobs)  # 15 > context 12
        graphed = generate_batch(model, PROMPTS, 10, cuda_graph=True, **knobs)
        assert EmulatedGraphedStep.replays - replays == 6  # tokens 3 .. 8 (9 and 10 past the context)
        assert graphed.ids.tolist() == eager.ids.tolist() and graphed.finished.tolist() == eager.finished.tolist()
        assert (graphed.k is None and eager.k is None) or graphed.k.tolist() == eager.k.tolist()
    streamed = list(generate(model, PROMPTS[0], 10, temperature=0, cuda_graph=True))
    assert ids_of(streamed) == ids_of(generate(model, PROMPTS[0], 10, temperature=0))


@pytest.mark.parametrize("name", ["transformer", "cws", "recurrent_moe"])
def test_emulated_graph_decoding_under_autocast_reads_weight_casts(name, monkeypatch):
    """Under bf16 autocast a graphed step reads the Linear weights cast once (the LM head's in
    bf16 at every replay, the model's own fp32 weights back afterwards) and decodes the tokens
    eager autocast does, which casts at every call."""
    import parallax.generation as generation

    monkeypatch.setattr(generation, "GraphedStep", EmulatedGraphedStep)
    monkeypatch.setattr(generation, "check_graphable", lambda model: None)
    model = STEP_MODELS[name]()
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    weights = dict(model.named_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = generate_batch(model, PROMPTS, 6, temperature=0)
        seen.clear()
        graphed = generate_batch(model, PROMPTS, 6, cuda_graph=True, temperature=0)
    assert graphed.ids.tolist() == eager.ids.tolist()
    assert seen[0] == torch.float32 and set(seen[1:]) == {torch.bfloat16}  # the prompt eager, then the step's
    assert all(p is weights[n] and p.dtype == torch.float32 for n, p in model.named_parameters())


def test_static_cache_positions_and_mask():
    cache = KVCache(1, 2, 4, 8, "cpu", torch.float32, static=True)
    k = torch.randn(1, 2, 3, 4)
    keys, _ = cache.append(k, k)
    assert keys.shape[2] == 8 and int(cache.position) == 3 and cache.length == 3
    torch.testing.assert_close(keys[:, :, :3], k)
    mask = attention_mask(2, 8, 2, "cpu", torch.tensor(3))  # queries at 3 and 4, window 2
    assert mask.tolist() == [[False, False, True, True, False, False, False, False],
                             [False, False, False, True, True, False, False, False]]
    with pytest.raises(ValueError, match="holds 8 positions"):
        cache.append(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))


def test_cuda_graph_decoding_needs_a_cuda_model_with_a_cache():
    model = MODELS["transformer"]()
    with pytest.raises(ParallaxError, match="decodes without a cache"):
        generate_batch(Uncached(model), PROMPTS, 3, cuda_graph=True)
    if not torch.cuda.is_available():
        with pytest.raises(ParallaxError, match="CUDA device"):
            generate_batch(model, PROMPTS, 3, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["transformer", "cws_halting_off", "recurrent_moe"])
def test_cuda_graph_decoding_under_autocast_reads_weight_casts(name, monkeypatch):
    """Under bf16 autocast the graph reads the weights cast once per generation: the tokens of
    the same graphed step casting them at every replay (the same values, cast elsewhere)."""
    import parallax.generation as generation

    model = STEP_MODELS[name]().cuda()
    prompts = torch.tensor(PROMPTS, device="cuda")
    decoded = {}
    for casts in (True, False):
        if not casts:
            monkeypatch.setattr(generation, "autocast_weights", lambda modules, device_type: None)
        steps = []

        def kept(step, *args):
            GraphedStep.__init__(step, *args)
            steps.append(step)

        monkeypatch.setattr(generation, "GraphedStep", type("Kept", (GraphedStep,), {"__init__": kept}))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            decoded[casts] = generate_batch(model, prompts, 8, cuda_graph=True, temperature=0).ids.tolist()
        assert steps and all((step.casts is not None) == casts for step in steps)
    assert decoded[True] == decoded[False]


# the fused reads' kernels run on CUDA only (on CPU they fall back to the absorbed read)
CUDA_STEP_MODELS = {
    **STEP_MODELS,
    "cws_fused_projected": lambda: cws(read="fused_projected"),
    "cws_fused_projected_iteration_graphs": lambda: cws(read="fused_projected", cuda_graph=True),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CUDA_STEP_MODELS))
def test_cuda_graph_decoding_equals_eager(name, monkeypatch):
    """Each token one graph replay, which never waits for the device, past the context the
    window path; greedy and seeded sampling: the tokens (and K) of eager decoding."""
    import parallax.generation as generation

    replays = []

    def replay(step, token, generator):
        torch.cuda.set_sync_debug_mode("error")
        try:
            replays.append(1)
            return GraphedStep.__call__(step, token, generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(generation, "GraphedStep", type("Counted", (GraphedStep,), {"__call__": replay}))
    model = CUDA_STEP_MODELS[name]().cuda()
    prompts = torch.tensor(PROMPTS, device="cuda")
    for knobs in (dict(temperature=0), dict(temperature=0.9, top_k=8, top_p=0.9, seed=3)):
        eager = generate_batch(model, prompts, 10, **knobs)  # 15 > context 12
        graphed = generate_batch(model, prompts, 10, cuda_graph=True, **knobs)
        assert graphed.ids.tolist() == eager.ids.tolist()
        assert (graphed.k is None and eager.k is None) or graphed.k.tolist() == eager.k.tolist()
    assert len(replays) == 12  # tokens 3 .. 8 of each generation


def test_bad_prompts_are_clear_errors():
    model = MODELS["swap"]()
    with pytest.raises(ParallaxError, match="empty"):
        generate(model, [], 5)
    with pytest.raises(ParallaxError, match="empty"):
        generate_batch(model, [[], []], 5)
    with pytest.raises(ParallaxError, match="context of 12"):
        generate(model, list(range(13)), 5)
    with pytest.raises(ParallaxError, match="context of 12"):
        generate_batch(model, torch.zeros(2, 13, dtype=torch.long), 5)
    with pytest.raises(ParallaxError, match="different lengths"):
        generate_batch(model, [[1, 2], [3]], 5)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits[:, [3, 0, 2, 1]], top_p=0.85)).tolist() == [[True, False, False, False]]


# ---------------------------------------------------------------- parallax generate


def text_run(tmp_path, name, model_overrides):
    """A text run directory as the trainer writes it, with spread-out weights."""
    from parallax.checkpoint import save_checkpoint
    from parallax.config import RunConfig
    from parallax.data import build_data
    from parallax.data.prepare import prepare_corpus, read_text_files
    from parallax.data.tokenizer import END_OF_TEXT
    from parallax.models import build_model
    from parallax.train.trainer import bind_data_shapes

    words = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "hill", "big", "small", "red", "blue", "sun", "moon"]
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "." for i in range(40)]
    (tmp_path / "t.txt").write_text("".join(f"{d}\n{END_OF_TEXT}\n" for d in docs))
    prepare_corpus(read_text_files([tmp_path / "t.txt"]), tmp_path / "data", vocab_size=280,
                   val_fraction=0.2, progress=False)
    cfg = RunConfig.from_dict({}, [f"model.name={name}", *model_overrides, "data.name=text",
                                   f"data.path={tmp_path / 'data'}", "data.seq_len=16"])
    bind_data_shapes(cfg, build_data(cfg.data))
    torch.manual_seed(0)
    model = spread(build_model(cfg.model), only=("embed", "decoder") if name == "cws" else ("",),
                   std=3.0 if name == "cws" else 0.3)
    path = tmp_path / "run"
    path.mkdir()
    (path / "config.json").write_text(cfg.to_json())
    save_checkpoint(path, 1, model, name, {"step": 1})
    return path


def test_cli_streams_the_greedy_continuation(tmp_path, capsys):
    from parallax.checkpoint import load_run
    from parallax.cli.main import main

    run = text_run(tmp_path, "transformer", ["model.d_model=32", "model.n_heads=2", "model.n_layers=1"])
    loaded = load_run(run)
    tokenizer = loaded.source.tokenizer
    prompt = "the big red cat sat"
    expected = ids_of(generate(loaded.model, tokenizer.encode(prompt), 20, temperature=0, stop_id=tokenizer.eot_id))
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "20", "--temperature", "0"]) == 0
    # the command prints the text of the tokens so far whenever it does not end inside a character
    texts = [tokenizer.decode(expected[:n]) for n in range(len(expected) + 1)]
    printed = next(t for t in reversed(texts) if not t.endswith("\ufffd"))
    assert capsys.readouterr().out == prompt + printed + "\n" and len(printed) > 3


def test_cli_show_k_colours_cws_tokens(tmp_path, capsys):
    from parallax.cli.main import main

    run = text_run(tmp_path, "cws", ["model.d_model=32", "model.n_heads=2", "model.mlp_hidden=32",
                                     "model.siren_hidden=32", "model.probe_head_dim=8", "model.decoder_heads=2",
                                     "model.k_max=4"])
    assert main(["generate", str(run), "--prompt", "the cat", "--max-new-tokens", "6", "--show-k"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("K: ") and "\nthe cat" in out and "\033[48;5;" in out.split("\n", 1)[1]
