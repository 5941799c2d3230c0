"""RMSNorm kernel vs pyllm.ref on fresh random inputs, odd sizes, every ISA path, gradients."""
import pytest
import torch

from pyllm import ops, ref
from pyllm._ext import C
from conftest import poison


@pytest.mark.parametrize("N,C_", [(1, 1), (3, 17), (17, 127), (5, 1000), (64, 384)])
def test_rmsnorm_forward_backward(isa, rng, N, C_):
    x = torch.randn(N, C_, generator=rng, requires_grad=True)
    w = (1 + 0.1 * torch.randn(C_, generator=rng)).requires_grad_()
    y = ops.rmsnorm(x, w, 1e-5)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = ref.rmsnorm(xr, wr, 1e-5)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    dy = torch.randn(N, C_, generator=rng)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-4)



# Above N*C = 32768 the backward runs in an OpenMP region where each thread sums its rows' dweight and adds it
# to the output under a critical section; 3 threads (a count dividing neither N) so every share must be added.
@pytest.mark.parametrize("N,C_", [(300, 384), (97, 401)])
def test_rmsnorm_backward_threaded_dweight(isa, rng, N, C_):
    """The largest case above was 64x384 = 24576 elements, under the threaded path's threshold: a dweight that
    kept only the last thread's share (`=` for `+=`) passed every test."""
    x = torch.randn(N, C_, generator=rng, requires_grad=True)
    w = (1 + 0.1 * torch.randn(C_, generator=rng)).requires_grad_()
    dy = torch.randn(N, C_, generator=rng)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref.rmsnorm(xr, wr, 1e-5).backward(dy.double())
    before = C().get_threads()
    C().set_threads(3)
    try:
        ops.rmsnorm(x, w, 1e-5).backward(dy)
    finally:
        C().set_threads(before)
    torch.testing.assert_close(x.grad, xr.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad.float(), rtol=1e-4, atol=1e-3)

def test_rmsnorm_writes_every_element(isa, rng):
    x = torch.randn(7, 33, generator=rng)
    w = torch.randn(33, generator=rng)
    out = poison(torch.empty(7, 33))
    rstd = poison(torch.empty(7))
    C().rmsnorm_forward(out.data_ptr(), rstd.data_ptr(), x.data_ptr(), w.data_ptr(), 7, 33, 1e-5)
    assert torch.isfinite(out).all() and torch.isfinite(rstd).all()
    torch.testing.assert_close(out, ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-5)


def test_rmsnorm_gradcheck_float64_reference_agrees(rng):
    # The kernel is fp32; check the analytic backward formula in float64 via the reference's autograd.
    x = torch.randn(3, 9, generator=rng, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ref.rmsnorm(a, b, 1e-5), (x, w))


def test_rmsnorm_rejects_bad_input():
    with pytest.raises(TypeError, match="dtype"):
        ops.rmsnorm(torch.zeros(2, 3, dtype=torch.float64), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        ops.rmsnorm(torch.zeros(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match="contiguous"):
        ops.rmsnorm(torch.zeros(3, 2).t(), torch.ones(3))
    # a negative eps gave NaN rows, a NaN eps NaN everywhere, without an error; eps 0 is allowed (as in torch)
    for eps, err in ((-1e-5, "must be >= 0"), (float("nan"), "must be a finite"), (float("inf"), "must be a finite"),
                     (None, "expected a number")):
        with pytest.raises((ValueError, TypeError), match=f"rmsnorm eps: {err}"):
            ops.rmsnorm(torch.ones(2, 3), torch.ones(3), eps)
    assert torch.equal(ops.rmsnorm(torch.ones(2, 3), torch.ones(3), 0.0), torch.ones(2, 3))
