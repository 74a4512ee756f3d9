"""Data parallel training on CPU: 2 gloo processes under torchrun.

Contracts: 2 ranks x batch b train exactly like 1 rank x batch 2b (DDP and FSDP2, with
gradient accumulation); a checkpoint written by 2 ranks resumes on 1; 2 ranks sharing an odd
number of validation batches log the metrics of 1 rank; the CWS with per-token halting in
training does not deadlock when its ranks halt at different K.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from parallax.checkpoint import load_run
from parallax.config import RunConfig
from parallax.models.output import ModelOutput
from parallax.models.transformer import Transformer, TransformerConfig
from parallax.train import Trainer, resume_config, train
from parallax.train.distributed import unsharded, wrap_model
from parallax.train.metrics_log import read_metrics
from parallax.train.runtime import Runtime
from parallax.train.trainer import flatten_metrics

TIMEOUT_S = 120  # a deadlocked rank fails the test instead of hanging the suite
STEPS = 4


# A tiny transformer on sort with a constant learning rate, so that a run continued past STEPS
# follows the longer reference run.
TINY = [
    "model.name=transformer", "model.d_model=32", "model.n_heads=2", "data.name=sort", "data.length=5",
    "data.vocab=8", "train.grad_accum=2", "train.warmup_steps=0", "train.min_lr_ratio=1.0",
    "train.save_every=2", "train.eval_every=1000", "train.eval_batches=3", "train.log_every=1",
    "train.progress=false", "train.device=cpu",
]


def torchrun(*args):
    """``parallax train --nproc 2 ARGS``, which relaunches itself under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "parallax", "train", "--nproc", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def assert_validation_of_one_rank(run_dir, step):
    """The validation metrics logged at ``step`` by 2 ranks are those of 1 rank on its checkpoint."""
    logged = {k: v for r in read_metrics(run_dir) if r["step"] == step for k, v in r.items() if k.startswith("val_")}
    assert "val_loss" in logged
    trainer = Trainer(resume_config(run_dir, []), run_dir, resume=True)
    assert trainer.step == step
    assert logged == pytest.approx(flatten_metrics(trainer.evaluate(), prefix="val"), rel=1e-5)


@pytest.fixture(scope="module")
def one_rank_batch_16(tmp_path_factory):
    """The reference: 1 process, batch 16, STEPS + 2 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(RunConfig.from_dict({}, TINY + ["train.batch_size=16", f"train.steps={STEPS + 2}"]), out)
    return losses(out)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank_with_twice_the_batch(parallel, tmp_path, one_rank_batch_16, one_thread):
    out = tmp_path / "run"
    over = TINY + ["train.batch_size=8", f"train.steps={STEPS}", f"train.parallel={parallel}"]
    torchrun("--out", str(out), *over)
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(one_rank_batch_16[step], rel=1e-5), step
    assert json.loads((out / "environment.json").read_text())["world_size"] == 2
    assert_validation_of_one_rank(out, STEPS)  # rank 0 scored batches 0 and 2, rank 1 batch 1

    # the full model and a single-process optimizer state: resume on 1 rank with batch 16
    assert load_run(out).step == STEPS
    train(resume_config(out, ["train.batch_size=16", f"train.steps={STEPS + 2}"]), out, resume=True)
    resumed = losses(out)
    for step in (STEPS + 1, STEPS + 2):
        assert resumed[step] == pytest.approx(one_rank_batch_16[step], rel=1e-5), step


def test_model_output_is_a_pytree_node():
    """FSDP2 (torch 2.11) finds the tensors of a module's output with tree_flatten and hooks the
    gradient reduce-scatter on them; hidden in an unregistered dataclass, nothing was reduced and
    the model never learned on GPUs."""
    logits, loss, k = torch.randn(2, 3, 5), torch.tensor(1.0), torch.ones(2, 3)
    leaves, spec = tree_flatten(ModelOutput(logits=logits, loss=loss, diagnostics={"k_used": k}))
    assert [id(t) for t in leaves] == [id(logits), id(loss), id(k)]
    assert tree_unflatten(leaves, spec).diagnostics["k_used"] is k


def test_fsdp_gathers_each_transformer_block_only_while_it_runs(tmp_path):
    """Per-block FSDP2 groups: while block 1 runs, block 0's weights are sharded again (the
    memory of one block's weights, not the model's); evaluation holds them all gathered."""
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = Transformer(TransformerConfig(vocab_size=16, d_model=32, n_heads=2, n_layers=3))
        wrap_model(model, Runtime(torch.device("cpu"), None, parallel="fsdp"))
        seen = {}

        def record(name):
            def hook(module, args):
                seen[name] = {i: isinstance(b.attn_norm.weight, DTensor) for i, b in enumerate(model.blocks)}
            return hook

        model.blocks[1].register_forward_pre_hook(record("block 1"))
        ids = torch.randint(0, 16, (2, 6))
        model(ids, ids).loss.backward()
        assert seen["block 1"] == {0: True, 1: False, 2: True}  # only the running block is whole
        with unsharded(model, Runtime(torch.device("cpu"), None, parallel="fsdp")):
            model(ids)
            assert seen["block 1"] == {0: False, 1: False, 2: False}
        assert all(isinstance(b.attn_norm.weight, DTensor) for b in model.blocks)
        model(ids, ids).loss.backward()  # training after the block gathers per block again
        assert seen["block 1"] == {0: True, 1: False, 2: True}
    finally:
        dist.destroy_process_group()


def test_cws_with_halting_in_training_does_not_deadlock(tmp_path, one_thread):
    """Tokens halt at different K on each rank; the no-grad loops hold no collective."""
    out = tmp_path / "cws"
    over = [
        "model.name=cws", "model.d_model=32", "model.mlp_hidden=32", "model.siren_hidden=32",
        "model.probe_head_dim=8", "model.k_max=6", "model.halt_in_training=true", "model.halt_tol=0.6",
        "data.name=bind_recall", "data.n_keys=4", "data.n_values=4", "data.n_bindings=2", "data.n_rebinds=1",
        "data.n_queries=2", "data.n_fillers=1", "train.batch_size=4", "train.steps=3",
        "train.eval_every=3", "train.save_every=3", "train.eval_batches=3", "train.log_every=1",
        "train.progress=false", "train.device=cpu",
    ]
    torchrun("--out", str(out), *over)
    assert sorted(losses(out)) == [1, 2, 3]
    rows = read_metrics(out)
    assert 1 < next(r["val_mean_k"] for r in rows if "val_mean_k" in r) < 6  # tokens did halt early
    assert load_run(out).step == 3
    assert_validation_of_one_rank(out, 3)  # with mean K and per-label metrics
