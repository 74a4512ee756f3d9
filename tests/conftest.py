import pytest
import torch


@pytest.fixture
def tiny_sort_overrides():
    """A transformer on sort small enough to train in a couple of seconds on CPU."""
    return [
        "model.name=transformer", "model.d_model=32", "model.n_heads=2", "data.name=sort",
        "data.length=5", "data.vocab=8", "train.batch_size=16", "train.steps=12",
        "train.eval_every=6", "train.save_every=6", "train.eval_batches=1", "train.log_every=1",
        "train.warmup_steps=2", "train.progress=false",
    ]


@pytest.fixture
def one_thread():
    """Tiny models: thread start-up costs more than it saves, far more on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_interpreter():
    """Runs a script under Triton's CPU interpreter (chosen when Triton is imported, so in a
    process of its own) and returns its last stdout line, parsed as JSON."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="the Triton kernels need triton (pip install parallax[gpu])")

    def run(script: str):
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        if "only 0-dimensional arrays can be converted to Python scalars" in done.stderr:
            # Triton 3.6's interpreter with numpy 2 cannot loop to a runtime bound (3.9's can; the
            # compiled kernels are unaffected and tested on CUDA)
            pytest.skip("this Triton's CPU interpreter cannot run a loop with a runtime bound")
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
