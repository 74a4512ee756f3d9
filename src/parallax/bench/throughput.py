"""Training and inference throughput of every model at matched sizes, beside the device's ceilings.

One run measures, on one device:

* the ceilings: a dense matrix product (8192^3 in bf16 on CUDA) in TFLOP/s and a large
  device-to-device copy in GB/s (bytes read plus bytes written), so that each model's
  achieved rate is a fraction of what this device does, measured in the same run;
* per model, at the same width, sequence length and batch: training tokens/s (forward,
  backward and a fused AdamW step under bf16 autocast; no clipping, no accumulation), the
  achieved TFLOP/s from the analytic count of ``parallax.bench.flops`` (every iteration, the
  no-grad ones too), peak allocated memory, and inference tokens/s at each generation batch.

Inference is greedy decoding of ``gen_tokens`` new tokens after a random prompt: models with
``new_cache`` run incrementally through ``parallax.generation`` (one token per call through
their KV caches / CWS state; the prompt's prefill is timed apart), the EAM, which is not causal, decodes all ``gen_tokens``
answer positions at once by MaskGIT (``decode_steps`` passes of ``solver_steps`` block
evaluations) after the same prompt; with ``gen_cuda_graph`` every token after the second is
one CUDA graph replay of the whole step (``generation.GraphedStep``). Inputs are random token ids. Timing: warm-up calls,
then CUDA events around each timed call (host clock on CPU), median over the timed calls.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from parallax.bench.flops import step_flops
from parallax.config import COMPILE_MODES, ModelConfig, build_run_config
from parallax.errors import ConfigError
from parallax.generation import generate_batch
from parallax.train.runtime import resolve_device

DEFAULT_MODELS = ("transformer", "swap", "recurrent", "eam", "cws")
MATMUL_SIZE = {"cuda": 8192, "cpu": 256}  # the CPU sizes only keep tests quick
COPY_BYTES = {"cuda": 2**30, "cpu": 2**24}
CEILING_WARMUP, CEILING_REPEATS = 5, 20


@dataclass
class ThroughputConfig:
    """What one run measures. ``overrides`` are ``MODEL.KEY=VALUE`` on the matched configs."""

    models: tuple[str, ...] = DEFAULT_MODELS
    dim: int = 512
    seq: int = 512
    batch: int = 32
    vocab: int = 8192
    warmup: int = 3
    steps: int = 10
    gen_batches: tuple[int, ...] = (1, 64)
    prompt: int = 16
    gen_tokens: int = 128
    gen_repeats: int = 3
    gen_cuda_graph: bool = False  # cached models decode each token by a CUDA graph replay (CUDA only)
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" adds CUDA graphs
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if self.vocab < 2:  # the models run, but on one token the loss and its gradients are 0
            raise ConfigError(f"vocab must be at least 2 (one token leaves nothing to predict), got {self.vocab}")
        if min(self.dim, self.seq, self.batch, self.steps, self.prompt, self.gen_tokens,
               self.gen_repeats, *self.gen_batches) < 1 or self.warmup < 0:
            raise ConfigError("sizes, steps and generation settings must be >= 1 (warm-up >= 0)")
        if self.gen_cuda_graph and self.gen_tokens < 3:
            raise ConfigError("gen tokens must be >= 3 with CUDA graphs (two are decoded before the graph replays)")
        if self.prompt + self.gen_tokens > self.seq:
            raise ConfigError(
                f"prompt ({self.prompt}) + gen tokens ({self.gen_tokens}) must fit in --seq ({self.seq})"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"--compile-mode {self.compile_mode} needs --compile")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")


def matched_configs(tc: ThroughputConfig) -> dict[str, ModelConfig]:
    """Each model at width ``dim`` with 64-wide heads and about eight blocks' worth of depth.

    transformer: 8 layers; swap: 2 layers per track, 2 passes; recurrent: prelude, one core
    layer iterated a fixed r = 8 (2 with gradient), coda; eam: its 12 solver steps (2 with
    gradient); cws: k_max = 24, live_steps 1, halting off, MLP probe 2*dim, SIREN dim.
    """
    import parallax.models  # noqa: F401  (registers the models)
    from parallax.registry import MODELS

    d, heads = tc.dim, max(1, tc.dim // 64)
    matched: dict[str, dict[str, Any]] = {
        "transformer": {"d_model": d, "n_layers": 8, "n_heads": heads},
        "swap": {"n_embd": d, "n_layer": 2, "num_loops": 2, "n_head": heads,
                 "n_kv_heads": max(1, heads // 2), "block_size": tc.seq},
        "recurrent": {"d_model": d, "n_heads": heads, "iterations": "fixed", "mean_iterations": 8,
                      "max_iterations": 16, "test_iterations": 8},
        "eam": {"dim": d, "heads": heads},
        "cws": {"d_model": d, "n_heads": heads, "decoder_heads": heads, "k_max": 24, "halting": False,
                "mlp_hidden": 2 * d, "siren_hidden": d},
    }
    for name in tc.models:
        MODELS.get(name)  # a one-line error for an unknown name
    per_model: dict[str, list[str]] = {}
    for item in tc.overrides:
        name, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise ConfigError(f"override {item!r} is not of the form MODEL.KEY=VALUE")
        MODELS.get(name)
        per_model.setdefault(name, []).append(f"model.{rest}")
    configs = {}
    for name in tc.models:
        table = {"name": name, "vocab_size": tc.vocab, "max_seq_len": tc.seq, **matched.get(name, {})}
        configs[name] = build_run_config({"model": table}, per_model.get(name, [])).model
    return configs


def resolve(tc: ThroughputConfig) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None: plain fp32)."""
    device = resolve_device(tc.device)
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    return device, torch.bfloat16 if bf16 else None


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    On CUDA, events around each call time the device's work (including any gaps where it
    waits for the host), without a synchronisation between calls.
    """
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def _matmul_ms(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return statistics.median(time_calls(lambda: torch.mm(a, b, out=c), device, CEILING_WARMUP, CEILING_REPEATS))


def _copy_ms(device: torch.device, nbytes: int) -> float:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return statistics.median(time_calls(lambda: dst.copy_(src), device, CEILING_WARMUP, CEILING_REPEATS))


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Dense matmul TFLOP/s in ``dtype`` and copy bandwidth in GB/s (read + write), medians."""
    n, nbytes = MATMUL_SIZE[device.type], COPY_BYTES[device.type]
    mm_ms, copy_ms = _matmul_ms(device, dtype, n), _copy_ms(device, nbytes)
    return {
        "matmul_size": n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "copy_bytes": nbytes,
        "copy_gbps": 2 * nbytes / (copy_ms * 1e-3) / 1e9,
    }


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def measure_training(
    model: torch.nn.Module, tc: ThroughputConfig, device: torch.device, dtype: torch.dtype | None
) -> dict[str, Any]:
    """Median step time of forward + backward + AdamW on random (batch, seq) batches; peak memory;
    the wall time of the first step, which pays for compilation (with ``--compile``, growing
    with the CWS's k_max, whose loop is unrolled into the graph)."""
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, tc.vocab, (tc.batch, tc.seq + 1), device=device, generator=generator)
               for _ in range(2)]  # two, alternated, so no step reuses the previous one's inputs
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model, mode=tc.compile_mode) if tc.compile else model
    model.train()
    step_index = 0

    def step() -> None:
        nonlocal step_index
        ids = batches[step_index % len(batches)]
        step_index += 1
        with _autocast(device, dtype):
            loss = forward(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_step_s = time.perf_counter() - start
    times = time_calls(step, device, tc.warmup, tc.steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_ms": statistics.median(times), "step_ms_all": times, "peak_memory_bytes": peak,
            "first_step_s": first_step_s}


def _cached_generation(
    model, prompt: torch.Tensor, new_tokens: int, marks: Callable[[], None], cuda_graph: bool = False
) -> None:
    """Greedy incremental decoding by ``parallax.generation``: the prompt once (marked when its
    token is sampled), then one token per call; the engine never waits for the device (any
    per-token host sync is the model's own). With ``cuda_graph`` the mark is after the second
    token, whose eager step and the capture then count with the prompt's."""
    marks()
    first = graph_tokens(cuda_graph) - 1
    generate_batch(model, prompt, new_tokens, temperature=0, cuda_graph=cuda_graph,
                   on_token=lambda step, *_: marks() if step == first else None)
    marks()


def graph_tokens(cuda_graph: bool) -> int:
    """The tokens decoded before the timed span: the prompt's, and with CUDA graphs the second
    (its step runs eagerly and the step is captured after it)."""
    return 2 if cuda_graph else 1


@torch.no_grad()
def _maskgit_generation(model, prompt: torch.Tensor, new_tokens: int, marks: Callable[[], None]) -> None:
    """The EAM's own decoding: the prompt given, ``new_tokens`` answer positions decoded at once."""
    b, p = prompt.shape
    ids = torch.cat([prompt, prompt.new_zeros(b, new_tokens - 1)], dim=1)  # (B, P + N - 1)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, p - 1:] = True  # the EAM's answer positions are loss_mask shifted by one
    marks()
    marks()  # no prefill
    model(ids, loss_mask=loss_mask)
    marks()


def inference_method(model: torch.nn.Module) -> str:
    if hasattr(model, "new_cache"):
        return "incremental (KV cache / recurrent state), greedy"
    cfg = model.config
    return f"MaskGIT, all tokens at once: {cfg.decode_steps} passes x {cfg.solver_steps} solver steps"


def measure_inference(
    model: torch.nn.Module, tc: ThroughputConfig, device: torch.device, dtype: torch.dtype | None, batch: int
) -> dict[str, Any]:
    """Decode tokens/s at ``batch`` (median over repeats), prefill time apart where there is one."""
    cached = hasattr(model, "new_cache")
    graph = cached and tc.gen_cuda_graph and device.type == "cuda"
    generate = functools.partial(_cached_generation, cuda_graph=graph) if cached else _maskgit_generation
    generator = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, tc.vocab, (batch, tc.prompt), device=device, generator=generator)
    model.eval()
    cuda = device.type == "cuda"

    def run(new_tokens: int) -> tuple[float, float]:
        stamps: list = []

        def mark() -> None:
            if cuda:
                stamps.append(torch.cuda.Event(enable_timing=True))
                stamps[-1].record()
            else:
                stamps.append(time.perf_counter())

        with _autocast(device, dtype):
            generate(model, prompt, new_tokens, mark)
        if cuda:
            torch.cuda.synchronize(device)
            return stamps[0].elapsed_time(stamps[1]), stamps[1].elapsed_time(stamps[2])
        return 1e3 * (stamps[1] - stamps[0]), 1e3 * (stamps[2] - stamps[1])

    run(min(tc.gen_tokens, 8))  # warm-up: kernels, handles, allocator
    runs = [run(tc.gen_tokens) for _ in range(tc.gen_repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    # incremental: the prefill yields the first token (with graphs, two), the timed loop the rest
    produced = tc.gen_tokens - graph_tokens(graph) if cached else tc.gen_tokens
    return {
        "batch": batch,
        "new_tokens": tc.gen_tokens,
        "cuda_graph": graph,
        "prefill_ms": prefill if cached else None,
        "decode_ms": decode,
        "tokens_per_s": batch * produced / (decode * 1e-3),
    }


def benchmark_model(
    name: str, cfg: ModelConfig, tc: ThroughputConfig, device: torch.device, dtype: torch.dtype | None,
    ceiling_tflops: float,
) -> dict[str, Any]:
    """One row: training and inference of one model. A failure is recorded in the row."""
    from parallax.models import build_model, count_parameters

    start = time.perf_counter()
    flops = step_flops(name, cfg, tc.batch, tc.seq)
    row: dict[str, Any] = {
        "model": name, "config": dataclasses.asdict(cfg),
        "flops_per_step": flops.train, "forward_flops": flops.forward, "no_grad_flops": flops.no_grad,
    }
    model = None
    try:
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        row["params"] = count_parameters(model)
        train = measure_training(model, tc, device, dtype)
        seconds = train["step_ms"] * 1e-3
        tflops = flops.train / seconds / 1e12
        row.update(train, tokens_per_step=tc.batch * tc.seq, train_tokens_per_s=tc.batch * tc.seq / seconds,
                   achieved_tflops=tflops, fraction_of_ceiling=tflops / ceiling_tflops)
        row["inference_method"] = inference_method(model)
        row["inference"] = [measure_inference(model, tc, device, dtype, b) for b in tc.gen_batches]
    except Exception as exc:  # noqa: BLE001  one model's failure (OOM, a bug) must not lose the others' rows
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["seconds"] = time.perf_counter() - start
    return row


def environment(device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "precision": "bf16 autocast" if dtype is not None else "fp32",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_throughput(tc: ThroughputConfig, json_path: str | Path | None = None, log=print) -> dict[str, Any]:
    """Measure the ceilings, then every model; the report is rewritten to ``json_path`` after
    each model, so a run cut short still leaves the rows it finished."""
    tc.validate()
    configs = matched_configs(tc)
    for name, cfg in configs.items():
        step_flops(name, cfg, tc.batch, tc.seq)  # an uncountable config fails before any timing
    device, dtype = resolve(tc)
    if tc.gen_cuda_graph and device.type != "cuda":
        raise ConfigError("--gen-cuda-graph decodes by CUDA graph replays, which need a CUDA device")
    report: dict[str, Any] = {**environment(device, dtype), "config": dataclasses.asdict(tc)}
    log(f"{report['device']}, torch {report['torch']}, {report['precision']}, {report['date']}")
    report["ceilings"] = measure_ceilings(device, dtype or torch.float32)
    ceil = report["ceilings"]
    log(f"ceilings: {ceil['matmul_dtype']} matmul {ceil['matmul_size']}^3 {ceil['matmul_tflops']:.1f} TFLOP/s, "
        f"copy {ceil['copy_bytes'] / 2**20:.0f} MiB {ceil['copy_gbps']:.0f} GB/s")
    report["rows"] = []
    for name, cfg in configs.items():
        row = benchmark_model(name, cfg, tc, device, dtype, ceil["matmul_tflops"])
        report["rows"].append(row)
        log(f"{name}: {row['seconds']:.1f} s" + (f"  ERROR {row['error']}" if "error" in row else ""))
        sys.stdout.flush()
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table, one line per model."""
    batches = report["config"]["gen_batches"]
    head = (f"{'model':<12}{'params':>11}{'train tok/s':>13}{'step ms':>10}{'TFLOP/s':>9}{'of peak':>9}"
            f"{'peak MiB':>10}" + "".join(f"{f'gen b{b} tok/s':>15}" for b in batches)
            + f"{'1st step s':>12}{'time s':>8}")
    lines = [head]
    for row in report["rows"]:
        if "train_tokens_per_s" not in row:
            lines.append(f"{row['model']:<12}  {row.get('error', 'no result')}")
            continue
        peak = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.0f}"
        gen = {g["batch"]: g["tokens_per_s"] for g in row.get("inference", [])}
        lines.append(
            f"{row['model']:<12}{row['params']:>11,}{row['train_tokens_per_s']:>13,.0f}{row['step_ms']:>10.1f}"
            f"{row['achieved_tflops']:>9.2f}{row['fraction_of_ceiling']:>9.1%}{peak:>10}"
            + "".join(f"{gen[b]:>15,.0f}" if b in gen else f"{'-':>15}" for b in batches)
            + f"{row['first_step_s']:>12.1f}{row['seconds']:>8.1f}"
        )
    return "\n".join(lines)
