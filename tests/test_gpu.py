"""CUDA-only checks (skipped elsewhere): mamba-ssm's kernel, the Triton kernels and the torch scan and conv agree,
standalone and inside the model, eager and under torch.compile(fullgraph=True); windowed attention's FlexAttention
kernel equals a masked SDPA; GPTQ gives the CPU's integers."""
import pytest
import torch

import train_gpt as tg
from helpers import unzero_output_projections

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def scan_inputs(b, d, n, t, dtype):
    g = torch.Generator(device="cuda").manual_seed(b * 1000 + t)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    return [r(b, t, d).to(dtype), (r(b, t, d) - 1).to(dtype), -torch.exp(r(d, n) * 0.5), r(b, t, n).to(dtype),
            r(b, t, n).to(dtype), r(d), r(b, t, d).to(dtype), r(d) * 0.5 - 2]


def fast_backends(backend):
    """The backend's scan and conv (torch's conv where it has none); skipped where it cannot run (mamba-ssm not
    installed, say)."""
    try:
        return tg.resolve_backends(backend, backend if backend in tg.CONV_BACKENDS else "torch", torch.device("cuda"))
    except RuntimeError as e:
        pytest.skip(str(e))


def grads(fn, inputs, dout):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize("backend", ["mamba_ssm", "triton"])
@pytest.mark.parametrize("shape", [(2, 64, 8, 2048), (1, 48, 16, 1000), (3, 40, 4, 37), (1, 32, 8, 2100)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_scan_backends_agree(backend, shape, dtype, tol):
    fast_fn = fast_backends(backend)[0]
    inputs = scan_inputs(*shape, dtype)
    dout = torch.randn_like(inputs[0])
    fast, own = grads(fast_fn, inputs, dout), grads(tg.torch_scan_fwd, inputs, dout)
    errors = [rel(a, b) for a, b in zip(fast, own)]
    print(backend, shape, dtype, ["%.1e" % e for e in errors])
    assert max(errors) < tol


@pytest.mark.parametrize("shape", [(2, 2048, 256), (3, 37, 40), (1, 1000, 100)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_conv_matches_torch(shape, dtype, tol):
    b, t, d = shape
    wide = torch.randn(b, t, 2 * d + 8, device="cuda", dtype=dtype)
    dout = torch.randn(b, t, d, device="cuda", dtype=dtype)
    w, bias = torch.randn(d, 4, device="cuda"), torch.randn(d, device="cuda")

    def outputs_and_grads(conv):  # x is a slice of a wider tensor, as the split of in_proj's output is
        leaves = [wide.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_()]
        out = conv(leaves[0][:, :, d : 2 * d], *leaves[1:])
        return [out, *torch.autograd.grad(out, leaves, dout)]

    errors = [rel(a, b) for a, b in zip(outputs_and_grads(tg.triton_conv), outputs_and_grads(tg.causal_conv_torch))]
    print(shape, dtype, ["%.1e" % e for e in errors])
    assert max(errors) < tol


@pytest.mark.parametrize("T,window", [(2048, 256), (1000, 100)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_windowed_attention_matches_masked_sdpa(T, window, dtype, tol):
    """FlexAttention's band (compiled in one graph, as in the model) against SDPA with the same mask in fp32."""
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k, v = (torch.randn(2, h, T, 64, device="cuda", generator=g).to(dtype) for h in (8, 4, 4))
    dout = torch.randn_like(q)
    i, j = torch.arange(T, device="cuda")[:, None], torch.arange(T, device="cuda")
    band = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=(j <= i) & (i - j < window), enable_gqa=True)
    flex = torch.compile(lambda q, k, v: tg.causal_attention(q, k, v, window), fullgraph=True, dynamic=False)
    errors = [rel(a, b) for a, b in zip(grads(flex, (q, k, v), dout), grads(band, (q, k, v), dout))]
    print(T, window, dtype, ["%.1e" % e for e in errors])
    assert max(errors) < tol


def tiny_args():
    args = tg.Hyperparameters({})
    args.num_layers, args.train_seq_len, args.ssm_layers = 2, 512, [0, 1]  # both layers exercise the scan
    args.attn_window, args.global_layers = 128, [0]  # layer 1 attends through FlexAttention's band
    return args


@pytest.mark.parametrize("backend", ["mamba_ssm", "triton"])
@pytest.mark.parametrize("compiled", [False, True])
def test_model_backends_agree(backend, compiled):
    torch.manual_seed(0)
    args = tiny_args()
    x = torch.randint(0, args.vocab_size, (4, args.train_seq_len), device="cuda")
    results = []
    for scan, conv, _ in (fast_backends(backend), (tg.torch_scan_fwd, tg.causal_conv_torch, "")):
        torch.manual_seed(0)
        model = tg.GPT(args, scan, conv).cuda()
        unzero_output_projections(model, std=0.02)  # so that every gradient is exercised
        run = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model
        with torch.autocast("cuda", torch.bfloat16):
            loss = run(x, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    assert abs(l1.item() - l2.item()) < 1e-2 * abs(l2.item())
    errors = {n: rel(g1[n], g2[n]) for n in g1}
    worst = max(errors, key=errors.get)
    print(backend, "compiled" if compiled else "eager", "worst gradient:", worst, errors[worst])
    assert errors[worst] < 2e-2


@pytest.mark.parametrize("shape", [(2, 64, 8, 2048), (3, 40, 4, 37)])
def test_triton_scan_from_state_matches_torch(shape):
    inputs = [x.float() for x in scan_inputs(*shape, torch.float32)]
    h0 = torch.randn(shape[0], shape[1], shape[2], device="cuda")
    (out, final), (ref_out, ref_final) = tg.triton_scan(*inputs, h0), tg.scan_from_state(*inputs, h0)
    assert rel(out, ref_out) < 1e-5 and rel(final, ref_final) < 1e-5


def test_stateful_windows_agree_between_triton_and_torch_scans(monkeypatch):
    torch.manual_seed(0)
    args = tiny_args()
    model = tg.GPT(args, tg.triton_scan, tg.causal_conv_torch).cuda().eval()
    x = torch.randint(0, args.vocab_size, (3, 4 * 256), device="cuda")

    def windows():
        carry = [{} for _ in model.blocks]
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            return torch.cat([model(x[:, s : s + 256], carry=carry) for s in range(0, x.size(1), 256)], dim=1)

    fast = windows()
    monkeypatch.setattr(tg, "triton", None)  # the mixer then carries the state through the torch scan
    assert rel(fast, windows()) < 1e-2


def test_gptq_on_cuda_matches_cpu():
    """The export's GPTQ on the GPU (as at record time) gives the CPU's integers, on a stack of 512-wide matrices
    with Hessians of correlated inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 512, generator=g) @ (torch.eye(512) + 0.05 * torch.randn(512, 512, generator=g))
    w, H = 0.02 * torch.randn(4, 384, 512, generator=g), (x.T @ x).expand(4, 512, 512).contiguous()
    q_cpu, scale_cpu = tg.gptq_quantize(w, H, 31)
    q_gpu, scale_gpu = tg.gptq_quantize(w.cuda(), H.cuda(), 31)
    assert torch.equal(scale_gpu.cpu(), scale_cpu)
    assert (q_gpu.cpu() != q_cpu).float().mean() < 1e-4  # float64 on both; only exact ties could differ
