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
