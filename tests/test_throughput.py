"""The throughput benchmark: its FLOP counts against torch's counter, and the CLI end to end on CPU."""

import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from parallax.bench.flops import step_flops
from parallax.bench.throughput import DEFAULT_MODELS, ThroughputConfig, matched_configs
from parallax.cli.main import main
from parallax.models import build_model

BATCH, SEQ, VOCAB = 2, 32, 64
# few iterations keep the counted passes quick; the counts scale with them all the same
TINY = ThroughputConfig(
    dim=64, seq=SEQ, batch=BATCH, vocab=VOCAB,
    overrides=("cws.k_max=3", "recurrent.mean_iterations=3", "eam.solver_steps=4"),
)


pytestmark = pytest.mark.usefixtures("one_thread")


def counted_flops(model, ids, backward: bool) -> int:
    """torch's count; the math SDPA backend decomposes attention into counted matmuls on CPU."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        if backward:
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name, extra", [(name, ()) for name in DEFAULT_MODELS] + [("cws", ("cws.read=projected",))])
def test_flop_count_matches_torch_counter(name, extra):
    cfg = matched_configs(dataclasses.replace(TINY, overrides=TINY.overrides + extra))[name]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    flops = step_flops(name, cfg, BATCH, SEQ)
    assert flops.forward == pytest.approx(counted_flops(model, ids, backward=False), rel=0.02)
    assert flops.train == pytest.approx(counted_flops(model, ids, backward=True), rel=0.02)


def test_cws_counts_every_iteration():
    cfg = matched_configs(TINY)["cws"]
    short = step_flops("cws", cfg, BATCH, SEQ)
    cfg.k_max = 6
    long = step_flops("cws", cfg, BATCH, SEQ)
    assert long.no_grad > short.no_grad and long.with_grad == short.with_grad


def test_cli_writes_a_row_per_model(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    code = main([
        "bench", "throughput", "--dim", "32", "--seq", "16", "--batch", "2", "--vocab", "64",
        "--warmup", "0", "--steps", "1", "--gen-batches", "1", "2", "--prompt", "2", "--gen-tokens", "3",
        "--gen-repeats", "1", "--set", "cws.k_max=2", "--json", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["model"] for row in report["rows"]] == list(DEFAULT_MODELS)
    assert report["ceilings"]["matmul_tflops"] > 0 and report["ceilings"]["copy_gbps"] > 0
    for row in report["rows"]:
        assert "error" not in row
        assert row["train_tokens_per_s"] > 0 and 0 < row["fraction_of_ceiling"]
        assert 0 < row["first_step_s"] < row["seconds"]
        assert [g["batch"] for g in row["inference"]] == [1, 2]
        assert all(g["tokens_per_s"] > 0 for g in row["inference"])
    table = capsys.readouterr().out
    assert all(name in table for name in DEFAULT_MODELS) and "1st step s" in table


@pytest.mark.parametrize("argv, message", [
    (["--models", "nonesuch"], "unknown model 'nonesuch'"),
    (["--set", "cws.k_max"], "MODEL.KEY=VALUE"),
    (["--set", "cws.nonesuch=1"], "unknown key 'nonesuch'"),
    (["--seq", "8", "--prompt", "4", "--gen-tokens", "8"], "must fit in --seq"),
    (["--device", "gpu0"], "unknown device"),
    (["--compile-mode", "reduce-overhead"], "needs --compile"),
    (["--gen-cuda-graph", "--gen-tokens", "2"], ">= 3 with CUDA graphs"),
])
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert main(["bench", "throughput", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
@pytest.mark.parametrize("argv", [["throughput"], ["halting"], ["memory", "--k", "2"]])
def test_cuda_without_a_gpu_is_a_one_line_error(argv, capsys):
    assert main(["bench", *argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and err.count("\n") == 1


def test_gen_cuda_graph_on_cpu_is_a_one_line_error(capsys):
    """Decoding by graph replays needs CUDA: said at once, not silently decoded eagerly."""
    argv = ["bench", "throughput", "--dim", "32", "--seq", "32", "--batch", "2", "--steps", "1",
            "--gen-tokens", "8", "--gen-cuda-graph", "--device", "cpu", "--models", "transformer"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "need a CUDA device" in err and err.count("\n") == 1


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_decoding_is_timed_from_the_first_replayed_token(cuda_graph, monkeypatch):
    """The decode span starts after the tokens decoded before it (one, or two with graphs:
    the second runs eagerly before the capture) and its rate counts only the tokens inside."""
    import parallax.bench.throughput as throughput

    marked = []

    def generate(model, prompt, new_tokens, *, on_token, cuda_graph, **_):
        for step in range(new_tokens):
            marked.append(("token", step))
            on_token(step, None, None, None)

    monkeypatch.setattr(throughput, "generate_batch", generate)
    stamps = []
    throughput._cached_generation(None, None, 5, lambda: stamps.append(len(marked)), cuda_graph=cuda_graph)
    before = throughput.graph_tokens(cuda_graph)
    assert stamps == [0, before, 5]  # start, end of the untimed tokens, end


# sizes at which a bench that should have refused its input runs in a second, not for minutes
SMALL = ["--dim", "32", "--seq", "16", "--batch", "2", "--warmup", "0", "--steps", "1", "--set", "cws.k_max=2",
         "--device", "cpu"]
SMALL_THROUGHPUT = ["--models", "cws", "--prompt", "2", "--gen-tokens", "3", "--gen-batches", "1", "--gen-repeats", "1"]
SMALL_HALTING = ["--tolerances", "1.0", "--no-compile"]


@pytest.mark.parametrize("argv, message", [
    (["halting", *SMALL_HALTING, "--set", "transformer.d_model=64"],
     "bench halting takes cws.KEY=VALUE overrides only, got 'transformer.d_model=64'"),
    (["throughput", *SMALL_THROUGHPUT, "--set", "transformer.d_model=64"],
     "bench throughput takes cws.KEY=VALUE overrides only, got 'transformer.d_model=64'"),
])
def test_override_of_a_model_not_measured_is_a_one_line_error(argv, message, capsys):
    """It would be ignored: the halting bench builds the CWS alone, throughput only --models."""
    assert main(["bench", *argv, *SMALL, "--vocab", "64"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["throughput", *SMALL_THROUGHPUT], ["halting", *SMALL_HALTING]])
@pytest.mark.parametrize("vocab", ["1", "0"])
def test_vocabulary_below_two_is_a_one_line_error(argv, vocab, capsys):
    """The models run on one token, but every target is that token: nothing is learnt or measured."""
    assert main(["bench", *argv, *SMALL, "--vocab", vocab]) == 2
    err = capsys.readouterr().err
    assert f"vocab must be at least 2 (one token leaves nothing to predict), got {vocab}" in err
    assert err.count("\n") == 1


def test_halting_bench_times_every_loop_at_the_same_mean_k(tmp_path, capsys):
    path = tmp_path / "halting.json"
    argv = ["bench", "halting", "--dim", "32", "--seq", "16", "--batch", "2", "--vocab", "64", "--warmup", "0",
            "--steps", "1", "--tolerances", "0.1", "1.0", "--no-compile", "--device", "cpu", "--json", str(path)]
    assert main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    off, *halting = rows
    assert (off["halting"], off["mean_k"], off["time_vs_off"]) == (False, 24.0, 1.0)
    assert [(r["tol"], r["loop"]) for r in halting] == [
        (0.1, "reference"), (0.1, "compact"), (1.0, "reference"), (1.0, "compact")]
    for reference, compact in zip(halting[::2], halting[1::2]):
        assert reference["mean_k"] == pytest.approx(compact["mean_k"])  # same halting decisions
        assert compact["bound"] == pytest.approx(compact["m"] + 0.15)
        assert compact["m"] <= compact["work"] <= 1 and reference["work"] is None  # the shrink rule's work
    assert halting[-1]["mean_k"] < halting[0]["mean_k"] <= 24  # a looser tolerance halts sooner
    assert "m+0.15" in capsys.readouterr().out


def test_multi_gpu_summary_reads_a_training_run(tmp_path, tiny_sort_overrides):
    """benchmarks/multi_gpu_summary.py: tokens/s from the logged windows, the loss curve, memory."""
    import importlib.util
    from pathlib import Path

    from parallax.config import RunConfig
    from parallax.train import train

    run_dir = tmp_path / "transformer" / "1gpu_b8"
    summary = train(RunConfig.from_dict({}, tiny_sort_overrides + ["train.steps=5", "train.log_every=1"]), run_dir)
    run_dir.with_suffix(".train.json").write_text(json.dumps(summary))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multi_gpu_summary.py"
    spec = importlib.util.spec_from_file_location("multi_gpu_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    got = module.summarise(run_dir)
    assert sorted(got["train_loss"]) == [1, 2, 3, 4, 5]
    assert got["tokens_per_s"] > 0
    assert (got["peak_memory_gib"] > 0) == torch.cuda.is_available()  # the run trains on CUDA where there is one
    assert got["parameters"] == summary["parameters"]
    (tmp_path / "transformer" / "2gpu_b4.train.json").write_text("")  # a run that crashed
    runs, failed = module.collect(tmp_path)
    assert list(runs) == ["transformer/1gpu_b8"] and failed == ["transformer/2gpu_b4"]
