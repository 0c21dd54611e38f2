"""The script's own selective scan and causal conv against plain references, outputs and every gradient."""
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg


def sequential_scan(u, delta, A, B, C, D, z, delta_bias):
    """The Mamba-1 recurrence one time step at a time; u/delta/z (batch, time, d), B/C (batch, time, n)."""
    dt = F.softplus(delta + delta_bias)
    h = torch.zeros(u.size(0), u.size(2), A.size(1), dtype=u.dtype)
    ys = []
    for t in range(u.size(1)):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(ys, 1) * F.silu(z)


def random_inputs(b, d, n, t, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return [r(b, t, d), r(b, t, d) - 1, -torch.exp(r(d, n)), r(b, t, n), r(b, t, n), r(d), r(b, t, d), r(d) * 0.5]


def outputs_and_grads(fn, inputs, dout):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, dout)]


# lengths: 1, odd, a power of two, and values that leave a partial last chunk (chunk = 2^floor(log2(T)/2))
@pytest.mark.parametrize("shape", [(1, 3, 2, 1), (2, 5, 3, 7), (2, 4, 8, 64), (1, 6, 4, 65), (3, 2, 5, 131), (1, 3, 16, 300)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_own_scan_matches_sequential_recurrence(shape, dtype, tol):
    inputs = random_inputs(*shape, dtype, seed=sum(shape))
    dout = torch.randn(shape[0], shape[3], shape[1], dtype=dtype)
    ours = outputs_and_grads(tg.torch_scan_fwd, inputs, dout)
    ref = outputs_and_grads(sequential_scan, [x.double() for x in inputs], dout.double())
    names = ["out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"]
    for name, a, b in zip(names, ours, ref):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert (a.double() - b).norm() <= tol * b.norm() + 1e-300, name  # dA is exactly 0 when T = 1


def test_linear_scan_matches_loop():
    a, b = torch.rand(3, 77, 4, dtype=torch.float64), torch.randn(3, 77, 4, dtype=torch.float64)
    h, expected = torch.zeros(3, 4, dtype=torch.float64), []
    for t in range(77):
        h = a[:, t] * h + b[:, t]
        expected.append(h)
    assert torch.allclose(tg.linear_scan(a, b), torch.stack(expected, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,t", [(4, 1), (4, 3), (4, 50), (2, 9), (1, 5)])
def test_own_conv_matches_left_padded_conv1d(k, t):
    x, w, bias = torch.randn(2, t, 6, dtype=torch.float64), torch.randn(6, k, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), w.unsqueeze(1), bias, groups=6)).transpose(1, 2)
    assert torch.allclose(tg.causal_conv_torch(x, w, bias), ref, rtol=1e-12, atol=1e-12)


def test_backend_choice_on_cpu():
    scan, conv, desc = tg.resolve_backends("auto", "auto", torch.device("cpu"))
    assert scan is tg.torch_scan_fwd and conv is tg.causal_conv_torch and desc.startswith("scan:torch")
    with pytest.raises(RuntimeError, match="SCAN_IMPL=mamba_ssm but it cannot run here"):
        tg.resolve_backends("mamba_ssm", "torch", torch.device("cpu"))
    with pytest.raises(ValueError, match="CONV_IMPL=cudnn: expected auto, triton, causal_conv1d, torch"):
        tg.resolve_backends("auto", "cudnn", torch.device("cpu"))


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) outputs, autograd registration and AOT dispatch of the torch scan ops, on inputs with
    the strides the model gives them (z, B and C are column slices of wider projections)."""
    u, delta, A, B, C, D, z, bias = random_inputs(2, 6, 4, 9, torch.float32, seed=3)
    z = torch.cat([z, torch.randn_like(z)], dim=-1)[..., :6]
    B, C = torch.cat([B, C], dim=-1).split(4, dim=-1)
    args = [u, delta, A, B, C, D, z, bias]
    assert not (z.is_contiguous() or B.is_contiguous())
    torch.library.opcheck(tg.torch_scan_fwd, [x.detach().requires_grad_() for x in args])
    torch.library.opcheck(tg.torch_scan_bwd, [torch.randn_like(u)] + args)
