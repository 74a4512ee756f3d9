"""The chunked selective scan against its sequential reference: outputs, states, gradients."""

import pytest
import torch
import torch.nn.functional as F

from parallax.ops.ssm_scan import selective_scan, selective_scan_chunked, selective_scan_ref


pytestmark = pytest.mark.usefixtures("one_thread")


def random_inputs(batch=2, length=23, channels=5, n_state=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, channels, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(batch, length, channels, generator=g, dtype=dtype))
    A = -torch.rand(channels, n_state, generator=g, dtype=dtype) * 4 - 0.1
    B = torch.randn(batch, length, n_state, generator=g, dtype=dtype)
    C = torch.randn(batch, length, n_state, generator=g, dtype=dtype)
    D = torch.randn(channels, generator=g, dtype=dtype)
    state = torch.randn(batch, channels, n_state, generator=g, dtype=dtype)
    return [u, delta, A, B, C, D, state]


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference_forward_and_state(chunk_size, with_state):
    u, delta, A, B, C, D, state = random_inputs()
    state = state if with_state else None
    y_ref, s_ref = selective_scan_ref(u, delta, A, B, C, D, state)
    y, s = selective_scan_chunked(u, delta, A, B, C, D, state, chunk_size)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_chunked_matches_reference_gradients():
    inputs = random_inputs(length=19)
    grads = []
    for scan in (selective_scan_ref, lambda *a: selective_scan_chunked(*a, chunk_size=4)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        y, s = scan(*leaves)
        g = torch.Generator().manual_seed(1)
        (y * torch.randn(y.shape, generator=g)).sum().backward(retain_graph=True)
        (s * torch.randn(s.shape, generator=g)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, g_ref, g_fast in zip(["u", "delta", "A", "B", "C", "D", "state"], *grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_scan_continues_from_a_split_sequence():
    """Scanning [0, 10) then [10, T) from the carried state equals one scan of [0, T)."""
    u, delta, A, B, C, D, _ = random_inputs(length=21)
    y_full, s_full = selective_scan(u, delta, A, B, C, D)
    y1, s1 = selective_scan(u[:, :10], delta[:, :10], A, B[:, :10], C[:, :10], D)
    y2, s2 = selective_scan(u[:, 10:], delta[:, 10:], A, B[:, 10:], C[:, 10:], D, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_full, rtol=1e-5, atol=1e-5)


def test_fast_decay_does_not_overflow():
    u, delta, A, B, C, D, state = random_inputs(length=40)
    y, s = selective_scan_chunked(u, delta * 50, A * 10, B, C, D, state, chunk_size=16)
    y_ref, s_ref = selective_scan_ref(u, delta * 50, A * 10, B, C, D, state)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- Triton scan

# Triton's CPU interpreter is chosen when Triton is imported, so the kernels' CPU checks run in a
# process of their own with TRITON_INTERPRET=1; it prints what the test asserts on.
TRITON_SCAN_CHECKS = r"""
import json, torch
from parallax.ops.ssm_scan import selective_scan_ref, selective_scan_triton, triton_scan
from tests.test_ssm_scan import random_inputs

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def check(length, channels, n_state, with_state, with_skip, dtype, chunk_for_backward=None):
    inputs = random_inputs(length=length, channels=channels, n_state=n_state, dtype=torch.float64, seed=length)
    inputs[5] = inputs[5] if with_skip else None
    inputs[6] = inputs[6] if with_state else None
    exact = [None if x is None else x.clone().requires_grad_() for x in inputs]
    fast = [None if x is None else x.to(dtype if i != 2 else torch.float32).requires_grad_()  # A stays fp32
            for i, x in enumerate(inputs)]
    y_ref, s_ref = selective_scan_ref(*exact)
    y, s = selective_scan_triton(*fast)
    if chunk_for_backward:
        triton_scan.CHUNK = chunk_for_backward
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (y, s)]
    ((y_ref * weights[0]).sum() + (s_ref * weights[1]).sum()).backward()
    ((y.double() * weights[0]).sum() + (s.double() * weights[1]).sum()).backward()
    return {"dtype": str(dtype), "y": rel(y, y_ref), "state": rel(s, s_ref),
            "out_dtypes": [str(y.dtype), str(s.dtype)],
            "grads": {name: rel(f.grad, e.grad) for name, f, e in zip("u delta A B C D state".split(), fast, exact)
                      if e is not None},
            "grad_dtypes_kept": all(f.grad.dtype == f.dtype for f in fast if f is not None)}

# (length, channels, n_state, with state, with D, dtype): lengths off the chunk, channels off the
# block (the default launch shape's and the others' below); N not a power of two; one token
# (decoding); fp16
cases = [(37, 40, 5, True, True, torch.float32), (16, 32, 4, False, False, torch.float32),
         (1, 8, 3, True, True, torch.float32), (21, 12, 4, False, True, torch.float16)]
out = [check(*case) for case in cases]
# other launch shapes (benchmarks/ssm_scan.py --sweep sets them): chunk, then forward and
# backward channels and warps
for shape in [(16, 32, 2, 8, 1), (8, 8, 1, 32, 2)]:
    (triton_scan.CHUNK, triton_scan.BLOCK_D, triton_scan.NUM_WARPS, triton_scan.BACKWARD_BLOCK_D,
     triton_scan.BACKWARD_NUM_WARPS) = shape
    out.append(check(*cases[0]))
# the backward walks the forward's chunks even if CHUNK changes in between (here both give two
# chunks of the 24 tokens, so only using the forward's would tell)
triton_scan.CHUNK = 16
out.append(check(24, 20, 4, True, True, torch.float32, chunk_for_backward=12))
u, delta, A, B, C, D, state = random_inputs(length=0)
y, s = selective_scan_triton(u, delta, A, B, C, D, state)
empty = {"y": list(y.shape), "state_kept": bool(torch.equal(s, state))}
print(json.dumps({"cases": out, "empty": empty}))
"""


def test_triton_scan_under_the_interpreter(triton_interpreter):
    """The Triton scan against the sequential reference in fp64: outputs, final state and the
    gradient of every input near 1e-6 in fp32 (below 1e-2 with fp16 inputs), with and without
    an initial state and D, at lengths off the kernel's chunk and widths off its block, at the
    default launch shape and two others."""
    out = triton_interpreter(TRITON_SCAN_CHECKS)
    for case in out["cases"]:
        tol = 1e-2 if case["dtype"] == "torch.float16" else 1e-5
        assert max(case["y"], case["state"], *case["grads"].values()) < tol, case
        assert case["out_dtypes"] == ["torch.float32"] * 2 and case["grad_dtypes_kept"], case
    assert len(out["cases"]) == 7 and len(out["cases"][0]["grads"]) == 7 and len(out["cases"][1]["grads"]) == 5
    assert out["empty"] == {"y": [2, 0, 5], "state_kept": True}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_triton_scan_on_cuda(compiled):
    """On the GPU, at a CWS-like shape: the Triton scan (the dispatcher's choice there) against
    the chunked scan in fp32 (outputs and gradients near 1e-5) and with bf16 inputs against fp32
    (below 1e-2), eager and inside torch.compile. The final state's gradient (of s.sum()) arrives
    expanded, which the kernels must copy before indexing it as contiguous (under Triton's
    interpreter an expanded tensor reads as if it were)."""
    pytest.importorskip("triton")
    from parallax.ops.ssm_scan import selective_scan_triton

    torch._dynamo.reset()
    inputs = [x.cuda() for x in random_inputs(batch=4, length=200, channels=96, n_state=16)]
    inputs[6] = None  # the training path: no initial state
    scan = torch.compile(selective_scan_triton) if compiled else selective_scan_triton

    def run(fn, dtype):
        leaves = [None if x is None else x.to(dtype if i != 2 else torch.float32, copy=True).requires_grad_()
                  for i, x in enumerate(inputs)]
        y, s = fn(*leaves)
        g = torch.Generator(device="cuda").manual_seed(1)
        ((y.float() * torch.randn(y.shape, generator=g, device="cuda")).sum() + s.float().sum()).backward()
        return [y, s] + [x.grad for x in leaves if x is not None]

    reference = run(lambda *a: selective_scan_chunked(*a, chunk_size=16), torch.float32)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for fast, ref in zip(run(scan, dtype), reference, strict=True):
            assert ((fast.float() - ref).norm() / ref.norm()).item() < tol, dtype


def test_triton_scan_refuses_shapes_it_would_misread(monkeypatch):
    """The kernels index every input at its exact shape, so a broadcastable one (which the
    PyTorch scans accept) is refused before any launch, in one line naming it; fp64, which
    they would compute in fp32, is left to the chunked scan, and so is everything with a
    Triton older than 3.3, which cannot compile the backward's tuples."""
    pytest.importorskip("triton")
    from parallax.ops.ssm_scan import selective_scan_triton, triton_scan

    u, delta, A, B, C, D, state = random_inputs()
    with pytest.raises(ValueError, match=r"B has shape \(1, 23, 4\), expected \(2, 23, 4\)"):
        selective_scan_triton(u, delta, A, B[:1], C, D, state)
    with pytest.raises(ValueError, match=r"D has shape \(\), expected \(5,\)"):
        selective_scan_triton(u, delta, A, B, C, D[0], state)
    monkeypatch.setattr(triton_scan, "INTERPRETED", True)  # as if on a device the kernels run on
    monkeypatch.setattr(triton_scan, "TRITON_HAS_TUPLES", True)
    assert triton_scan.usable(u) and not triton_scan.usable(u.double())
    monkeypatch.setattr(triton_scan, "TRITON_HAS_TUPLES", False)  # a Triton before 3.3: the chunked scan
    assert not triton_scan.usable(u)
