"""The Triton scan kernels, run on the CPU by Triton's interpreter, against the sequential recurrence (forward and
every gradient; several chunks, a partial last chunk or whole chunks only, channel and state counts that leave
masked lanes; z, B and C given as slices), and its forward from a given state against the torch scan's;
the Triton conv against the torch conv; and the scan's layouts, compiled for sm_90 on the CPU."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from kernel_resources import compile_sm90

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

CHECK = """
import sys, torch
import train_gpt as tg
from test_scan import outputs_and_grads, random_inputs, sequential_scan
# (steps loaded by the forward, steps x states of the backward's chunk, shape): chunks of 1 to 64 steps
cases = [(8, 16, (1, 3, 2, 1)), (8, 16, (2, 5, 3, 7)), (8, 16, (1, 40, 8, 9)), (8, 16, (2, 33, 4, 13)),
         (4, 16, (2, 33, 4, 13)), (4, 16, (1, 40, 8, 9)), (16, 16, (2, 33, 4, 13)), (1, 1, (2, 5, 3, 7)),
         (64, 1024, (1, 35, 16, 130)), (8, 16, (2, 33, 4, 16)), (8, 16, (1, 40, 8, 24))]  # the last two: whole chunks
for fwd_steps, step_states, shape in cases:
    tg.SCAN_FWD_STEPS, tg.SCAN_BWD_STEP_STATES = fwd_steps, step_states
    inputs = random_inputs(*shape, torch.float32, seed=sum(shape))
    dout = torch.randn(shape[0], shape[3], shape[1])
    ours = outputs_and_grads(tg.triton_scan, inputs, dout)
    ref = outputs_and_grads(sequential_scan, [x.double() for x in inputs], dout.double())
    for name, a, b in zip(["out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"], ours, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, (shape, name)
        assert (a.double() - b).norm() <= 2e-5 * b.norm() + 1e-30, (tg.scan_chunks(shape[2]), shape, name)
tg.SCAN_FWD_STEPS, tg.SCAN_BWD_STEP_STATES = 8, 16
for b, d, n, t in [(2, 33, 4, 16), (1, 6, 3, 11)]:  # z, B and C given as column slices, as in the model
    u, delta, A, B, C, D, z, bias = random_inputs(b, d, n, t, torch.float32, seed=t)
    dout, zw, bcw = torch.randn(b, t, d), torch.randn(b, t, d + 7), torch.randn(b, t, 2 * n + 1)
    zw[:, :, 7:], bcw[:, :, 1 : n + 1], bcw[:, :, n + 1 :] = z, B, C
    sliced = lambda u, delta, A, zw, bcw, D, bias: tg.triton_scan(u, delta, A, bcw[:, :, 1 : n + 1], bcw[:, :, n + 1 :],
                                                                  D, zw[:, :, 7:], bias)
    out, du, ddelta, dA, dzw, dbcw, dD, dbias = outputs_and_grads(sliced, [u, delta, A, zw, bcw, D, bias], dout)
    ref = outputs_and_grads(tg.triton_scan, [u, delta, A, B, C, D, z, bias], dout)
    ours = [out, du, ddelta, dA, dbcw[:, :, 1 : n + 1], dbcw[:, :, n + 1 :], dD, dzw[:, :, 7:], dbias]
    assert all(torch.allclose(a, r, rtol=1e-6, atol=1e-7) for a, r in zip(ours, ref)), (b, d, n, t)
    assert not dzw[:, :, :7].any() and not dbcw[:, :, 0].any()
inputs = random_inputs(2, 5, 3, 7, torch.float32, seed=1)
h0 = torch.randn(2, 5, 3)
out, final = tg.triton_scan(*inputs, h0)
ref_out, ref_final = tg.scan_from_state(*[x.double() for x in inputs], h0.double())
assert (out.double() - ref_out).norm() <= 2e-5 * ref_out.norm() and (final.double() - ref_final).norm() <= 2e-5 * ref_final.norm()
op_inputs = [x.contiguous().requires_grad_() for x in inputs]
op_inputs[2] = inputs[2].t().contiguous().requires_grad_()  # the op takes A^T and h0 as (batch, d_state, d_inner)
torch.library.opcheck(tg.triton_scan_fwd, op_inputs + [h0.mT.contiguous()])
tg.CONV_TILE = (4, 8, 12)  # several blocks and programs in time, masked channels
for b, t, d, k in [(2, 37, 10, 4), (1, 5, 3, 4), (2, 30, 9, 3)]:
    wide, w, bias, dout = torch.randn(b, t, d + 5), torch.randn(d, k), torch.randn(d), torch.randn(b, t, d)
    results = []
    for conv in (tg.triton_conv, tg.causal_conv_torch):
        leaves = [v.clone().requires_grad_() for v in (wide, w, bias)]
        out = conv(leaves[0][:, :, 5:], *leaves[1:])  # x: a slice of a wider tensor, as in the model
        results.append([out, *torch.autograd.grad(out, leaves, dout)])
    assert all((a - r).norm() <= 1e-6 * r.norm() for a, r in zip(*results)), (b, t, d, k)
torch.library.opcheck(tg.triton_conv_fwd, [torch.randn(2, 9, 5, requires_grad=True), torch.randn(5, 4), torch.randn(5)])
print("ok")
"""


def test_triton_scan_in_the_interpreter():
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("d_state", [4, 8])
def test_forward_keeps_each_channel_in_one_thread(d_state):
    """One layout for every tile of the forward, so no layout conversion or shared memory: Triton picks layouts from
    what it can prove about addresses, and a kernel that let it vectorise the channel loads spread each channel's
    states over threads and converted layouts every step (f0cdc8a, about 100x slower). Passing d_inner specialised
    gives this kernel such conversions too."""
    import train_gpt as tg

    warps = tg.SCAN_WARPS[0]
    kf, k = tg.scan_chunks(d_state)
    ir = compile_sm90(tg._scan_fwd_kernel, dict(N=d_state, NP=d_state, BD=32 * warps, K=k, KF=kf, EVEN=True),
                      warps).asm["ttgir"]
    assert len(set(re.findall(r"#blocked\d* = ", ir))) == 1
    assert "ttg.convert_layout" not in ir and "local_alloc" not in ir


def test_kernel_resources_reports_every_kernel():
    """tools/kernel_resources.py compiles each kernel for sm_90 on the CPU and reads its registers and its main loop
    from the cubin."""
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "kernel_resources.py")
    out = subprocess.run([sys.executable, tool, "--states", "4"], capture_output=True, text=True, timeout=600,
                         check=True).stdout.splitlines()
    rows = [line.rsplit(None, 7) for line in out[1:]]
    assert [r[0] for r in rows] == ["conv forward, tile 32:64:2048", "conv backward, tile 32:64:2048",
                                    "scan forward, state 4", "scan backward, state 4"]
    assert all(0 < int(r[2]) <= 255 and int(r[5]) > 0 and int(r[6]) > 0 for r in rows)
    assert [int(r[7]) > 0 for r in rows] == [False] * 3 + [True]  # only the scan backward sums across lanes
