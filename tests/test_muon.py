"""Muon: the batched Newton-Schulz iteration and one optimizer step against a per-matrix computation."""
import torch

import train_gpt as tg


def test_newton_schulz_batched_equals_one_by_one_and_orthogonalises():
    g = torch.randn(3, 96, 32, dtype=torch.float64)
    batched = tg.newton_schulz(g)
    for i in range(3):
        assert torch.allclose(batched[i], tg.newton_schulz(g[i]), atol=1e-6)
        sv = torch.linalg.svdvals(batched[i].double())
        assert 0.6 < sv.min() and sv.max() < 1.25  # the quintic's band around 1, not exact orthogonality


def test_muon_step_matches_hand_computed_update():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in ((8, 16), (8, 16), (24, 8), (5, 5))]
    params[3].grad = None
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params[:3]]
    opt = tg.Muon(params, lr=0.1, momentum=0.9, weight_decay=0.5)
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for p, s, g in zip(params, start, grads):
        w, buf = s.clone(), torch.zeros_like(g)
        for _ in range(2):
            buf = 0.9 * buf + g
            update = tg.newton_schulz(g + 0.9 * buf) * max(1.0, p.size(0) / p.size(1)) ** 0.5
            w = w * (1 - 0.1 * 0.5) - 0.1 * update
        assert torch.allclose(p.detach(), w, atol=1e-5)
    assert torch.allclose(params[3].detach(), start[3] * (1 - 0.05) ** 2)  # no gradient: only the decay
