"""Model causality, optimizer assignment, LR schedule, and the quantized export."""

import pytest
import torch

import train_gpt as tg
from helpers import small_args, unzero_output_projections

BITS = {"mixer": 6, "mlp": 6}  # the script's defaults


@pytest.mark.parametrize("ssm_layers", [[0, 1], [1], []])  # every layer hybrid, one of two, attention only
def test_model_is_causal(ssm_layers):
    torch.manual_seed(0)
    model = tg.GPT(small_args(ssm_layers=ssm_layers))
    unzero_output_projections(model, std=0.05)  # zero-initialised projections would hide the mixer
    x = torch.randint(0, 1024, (2, 40))
    base = model(x)
    for t in (0, 17, 39):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 1024
        out = model(x2)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_optimizer_assignment():
    model = tg.GPT(small_args())
    adam, muon = tg.build_optimizers(small_args(), model, fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = [names[id(p)] for p in muon.param_groups[0]["params"]]
    assert not any(s in n for n in muon_names for s in tg.SSM_SENSITIVE)  # no A_log, dt, conv or D under Muon
    assert all(p.dim() == 2 for p in muon.param_groups[0]["params"]) and len(muon_names) == 2 * 7 + 1  # + value_proj
    assert {names[id(p)] for p in adam.param_groups[0]["params"]} == {"tok_emb.weight", "value_embed.weight"}
    ssm_group = adam.param_groups[1]
    assert ssm_group["lr"] == small_args().ssm_lr and {names[id(p)].split(".")[-1] for p in ssm_group["params"]} == \
        {"A_log", "weight", "dt_bias", "conv_weight", "conv_bias", "D_skip"}
    assert sum(len(g["params"]) for o in (adam, muon) for g in o.param_groups) == len(names)


@pytest.mark.parametrize("ssm_layers", [[1], []])
def test_layers_outside_ssm_layers_have_no_mamba_branch(ssm_layers):
    """A layer not in SSM_LAYERS mixes with attention alone (no SSM tensors, no merge gate, K|V in the fused
    projection); the others keep the branch; every parameter still has an optimizer."""
    args = small_args(ssm_layers=ssm_layers)
    model = tg.GPT(args)
    ssm_names = tg.SSM_SENSITIVE + ("ssm_out", "x_proj", "merge_alpha")
    for i, block in enumerate(model.blocks):
        names = [n for n, _ in block.named_parameters()]
        assert any(s in n for n in names for s in ssm_names) == (i in ssm_layers)
        kv = 2 * args.num_kv_heads * block.mixer.head_dim
        assert block.mixer.in_proj.weight.shape == (kv + (2 * args.ssm_inner if i in ssm_layers else 0), args.model_dim)
    adam, muon = tg.build_optimizers(args, model, fused=False)
    assert (adam.param_groups[1]["params"] == []) == (not ssm_layers)
    assert sum(len(g["params"]) for o in (adam, muon) for g in o.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("env", [dict(SSM_LAYERS="2"), dict(SSM_LAYERS="-1"), dict(SSM_INNER="0")])
def test_bad_ssm_layers_or_width_are_refused(env):
    args = tg.Hyperparameters({"NUM_LAYERS": "2", **env})
    with pytest.raises(ValueError, match="SSM_LAYERS="):
        tg.GPT(args)


def test_attention_window_reaches_exactly_its_last_positions():
    """With window w, output t depends on keys and values t-w+1..t only (its own included); w >= T or 0 is plain
    causal attention; query heads share KV heads as in GQA."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 30, 8, dtype=torch.float64), *torch.randn(2, 2, 2, 30, 8, dtype=torch.float64)
    base = tg.causal_attention(q, k, v, 5)
    for p in (0, 12, 29):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, p] += 1
        v2[:, :, p] -= 1
        changed = (tg.causal_attention(q, k2, v2, 5) - base).abs().amax((0, 1, 3)) > 0
        assert changed.tolist() == [p <= t < p + 5 for t in range(30)]
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(tg.causal_attention(q, k, v, 30), full) and torch.allclose(tg.causal_attention(q, k, v), full)
    assert torch.allclose(tg.causal_attention(q, k, v, 1), v.repeat_interleave(2, dim=1))


def test_attention_window_skips_the_global_layers():
    model = tg.GPT(small_args(num_layers=4, ssm_layers=[0, 1, 2, 3], attn_window=64))
    assert [b.mixer.window for b in model.blocks] == [0, 64, 0, 0]  # first, middle (4 // 2) and last are global
    model = tg.GPT(small_args(num_layers=4, ssm_layers=[], attn_window=64, global_layers=[1]))
    assert [b.mixer.window for b in model.blocks] == [64, 0, 64, 64]
    with pytest.raises(ValueError, match="GLOBAL_LAYERS="):
        tg.GPT(small_args(num_layers=4, ssm_layers=[], global_layers=[4]))


def test_ssm_layers_setting():
    assert tg.Hyperparameters({"NUM_LAYERS": "3"}).ssm_layers == [0, 1, 2]  # every block a Hymba block
    assert tg.Hyperparameters({"SSM_LAYERS": "0,4"}).ssm_layers == [0, 4]
    assert tg.Hyperparameters({"SSM_LAYERS": ""}).ssm_layers == []


def test_lr_schedule():
    assert tg.lr_scale(0.0, 0.4) == 1.0 and tg.lr_scale(0.6, 0.4) == 1.0
    assert tg.lr_scale(0.8, 0.4) == pytest.approx(0.5)
    assert tg.lr_scale(1.0, 0.4) == pytest.approx(0.0) and tg.lr_scale(1.3, 0.4) == pytest.approx(0.0)
    assert tg.lr_scale(0.99, 0.0) == 1.0


def test_quantize_rows_beats_plain_absmax():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 300)) * torch.rand(64, 1)  # heavy tails: clipping pays
    for qmax in (31, 127):
        q, s = tg.quantize_rows(w, qmax)
        assert q.dtype == torch.int8 and q.abs().max() <= qmax and s.dtype == torch.float16
        err = (q.float() * s.float()[:, None] - w).square().sum(1)
        s_abs = (w.abs().amax(1, keepdim=True) / qmax).half().float()
        err_abs = ((w / s_abs).round().clamp(-qmax, qmax) * s_abs - w).square().sum(1)
        assert (err <= err_abs * (1 + 1e-6)).all()
        if qmax == 31:
            assert (err < 0.95 * err_abs).sum() >= 8


@pytest.mark.parametrize("bits", [BITS, {"mixer": 5, "mlp": 4}])
def test_export_round_trip_and_byte_accounting(bits):
    torch.manual_seed(0)
    state = tg.GPT(small_args(model_dim=256)).state_dict()
    kinds = {n: tg.export_kind(n, t) for n, t in state.items()}
    assert kinds["tok_emb.weight"] == kinds["value_embed.weight"] == "fp16"
    assert kinds["blocks.0.mlp.fc.weight"] == "mlp" and kinds["blocks.0.mixer.in_proj.weight"] == "mixer"
    assert {kinds[n] for n in state if any(s in n for s in tg.SSM_SENSITIVE)} == {"fp16"}
    blob, zeroed = tg.serialize(state, bits)
    assert zeroed == 0
    import lzma, json
    payload = lzma.decompress(blob)
    header_len = int.from_bytes(payload[:4], "little")
    body = sum(t.numel() * 2 if kinds[n] == "fp16" else t.numel() + 2 * t.size(0) for n, t in state.items())
    assert len(payload) == 4 + header_len + body
    assert [row[0] for row in json.loads(payload[4 : 4 + header_len])] == list(state)
    restored = tg.deserialize(blob)
    for n, t in state.items():
        r = restored[n]
        assert r.shape == t.shape and r.dtype == torch.float32
        if kinds[n] == "fp16":
            assert torch.equal(r, t.half().float())
        else:  # exactly q * scale; within half a step wherever the row's clip did not cut
            qmax = 2 ** (bits[kinds[n]] - 1) - 1
            q, scale = tg.quantize_rows(t.reshape(t.size(0), -1), qmax)
            s = scale.float()[:, None]
            assert torch.equal(r, q.float() * s)
            assert (q.abs().amax(1) == qmax)[t.reshape(t.size(0), -1).abs().amax(1) > 0].all()  # each row uses the range
            inside = t.abs() <= qmax * s
            assert ((r - t).abs() <= s / 2 * (1 + 1e-5))[inside].all()
    with pytest.raises(lzma.LZMAError):
        tg.deserialize(b"X" + blob[1:])
    with pytest.raises(ValueError, match="trailing bytes"):
        tg.deserialize(lzma.compress(payload + b"\0"))


def test_export_over_budget_zeroes_the_cheapest_unit_entries_until_it_fits():
    torch.manual_seed(0)
    state = tg.GPT(small_args(model_dim=256)).state_dict()
    for name, t in state.items():
        if tg.export_kind(name, t) in ("mixer", "mlp"):
            t.normal_(std=0.02)  # trained-like weights: many entries quantize to +-1
    full, _ = tg.serialize(state, BITS)
    budget = len(full) - 2000
    blob, zeroed = tg.serialize(state, BITS, budget)
    assert len(blob) <= budget and zeroed > 0
    before, after = tg.deserialize(full), tg.deserialize(blob)
    changed, kept_costs, pruned_costs = 0, [], []
    for name, t in state.items():
        if tg.export_kind(name, t) not in ("mixer", "mlp"):
            assert torch.equal(before[name], after[name])
            continue
        q, scale = tg.quantize_rows(t, 31)
        s = scale.float()[:, None]
        unit = q.abs() == 1
        cost = t.square() - (t - q.float() * s).square()
        diff = before[name] != after[name]
        assert (unit | ~diff).all() and (after[name][diff] == 0).all()  # only +-1 entries, and they became 0
        changed += int(diff.sum())
        pruned_costs.append(cost[diff])
        kept_costs.append(cost[unit & ~diff])
    assert changed == zeroed
    assert torch.cat(pruned_costs).max() <= torch.cat(kept_costs).min()  # the cheapest ones went first


def test_fullgraph_compile_matches_eager():
    torch.manual_seed(0)
    model = tg.GPT(small_args(num_layers=1, ssm_layers=[0]))
    unzero_output_projections(model, std=0.05)
    x = torch.randint(0, 1024, (2, 48))
    grads = []
    for run in (model, torch.compile(model, fullgraph=True, dynamic=False)):
        loss = run(x, x)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, rtol=1e-5) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g0, g1))


@torch.no_grad()  # the carried-state path is forward-only
@pytest.mark.parametrize("ssm_layers,attn_window", [([0, 1], 0), ([1], 0), ([], 0), ([0, 1], 5)])
def test_windows_with_carried_state_equal_one_long_forward(monkeypatch, ssm_layers, attn_window):
    """Reading a sequence window by window with the carried state (SSM state, conv tail, previous window's keys)
    gives the logits of one forward over the whole sequence whose attention sees the last W positions (or its
    layer's shorter ATTN_WINDOW)."""
    torch.manual_seed(0)
    model = tg.GPT(small_args(ssm_layers=ssm_layers, attn_window=attn_window, global_layers=[0])).double()
    unzero_output_projections(model, std=0.05)
    W, T = 16, 3 * 16 + 5  # a partial last window
    x = torch.randint(0, 1024, (2, T))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def banded(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        i, j = torch.arange(q.size(-2))[:, None], torch.arange(k.size(-2))
        mask = (j <= i) if is_causal else attn_mask
        return sdpa(q, k, v, attn_mask=mask & (j > i - W), enable_gqa=enable_gqa)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", banded)
    reference = model(x)
    monkeypatch.undo()
    carry = [{} for _ in model.blocks]
    windows = torch.cat([model(x[:, s : s + W], carry=carry) for s in range(0, T, W)], dim=1)
    assert torch.allclose(windows, reference, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(model(x[:, W : 2 * W]), reference[:, W : 2 * W])  # the carried state matters


def test_attention_runs_in_bf16_under_autocast(monkeypatch):
    """As on the GPU: under bf16 autocast q, k and v reach attention in bf16 (a fp32 gain must not promote q)."""
    model = tg.GPT(small_args(num_layers=1, ssm_layers=[0]))
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, **kw))
    x = torch.randint(0, 1024, (2, 32))
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(x, x)
    loss.backward()
    assert seen == [(torch.bfloat16,) * 3] and torch.isfinite(loss)


def test_xsa_removes_each_heads_own_value_direction():
    """XSA: each head's attention output is orthogonal to its own token's value (of the KV head it shares), so
    the first token, which attends only to itself, gets no attention output at all."""
    torch.manual_seed(0)
    args = small_args()
    mixer = tg.GPT(args).blocks[0].mixer.double()
    with torch.no_grad():
        mixer.merge_alpha.fill_(40.0)  # weight of the SSM branch ~4e-18: the output is the attention branch
        mixer.out_proj.weight.copy_(torch.eye(args.model_dim))
    x = torch.randn(2, 24, args.model_dim, dtype=torch.float64)
    attn = mixer(x).view(2, 24, args.num_heads, -1)
    v = mixer.in_proj(x).split(mixer.splits, dim=-1)[1].view(2, 24, args.num_kv_heads, -1)
    v_of_head = v.repeat_interleave(args.num_heads // args.num_kv_heads, dim=2)
    assert (attn * v_of_head).sum(-1).abs().max() < 1e-12
    assert attn[:, 0].abs().max() < 1e-12 and attn[:, 1:].abs().amin(-1).amin(-1).min() > 0


def test_value_embeddings_are_added_to_the_last_layers_values():
    """Each of the last VALUE_EMBED_LAYERS mixers gets gain * value_proj(value_embed(idx)), the others nothing,
    and a mixer adds it to its values exactly as if in_proj's V had it (not to the queries, keys or SSM input)."""
    torch.manual_seed(0)
    args = small_args(num_layers=3, ssm_layers=[0, 1, 2], value_embed_layers=2)
    model = tg.GPT(args).double()
    unzero_output_projections(model, std=0.05)
    with torch.no_grad():
        model.value_gains.copy_(torch.tensor([0.5, -2.0]))
    received = []
    hooks = [b.mixer.register_forward_pre_hook(lambda _, inputs: received.append(inputs[1])) for b in model.blocks]
    idx = torch.randint(0, 1024, (2, 12))
    model(idx)
    for h in hooks:
        h.remove()
    ve = model.value_proj(model.value_embed(idx).double())
    assert received[0] is None and torch.equal(received[1], 0.5 * ve) and torch.equal(received[2], -2.0 * ve)

    mixer, (kv, _, di, _) = model.blocks[2].mixer, model.blocks[2].mixer.splits
    x, e = torch.randn(2, 12, args.model_dim, dtype=torch.float64), torch.randn(2, 12, kv, dtype=torch.float64)
    expected = mixer(x, e)
    shift = torch.cat((torch.zeros_like(e), e, torch.zeros(2, 12, 2 * di, dtype=torch.float64)), -1)
    mixer.in_proj.register_forward_hook(lambda _, inputs, out: out + shift)  # in_proj's V moved by e
    assert torch.allclose(mixer(x), expected, rtol=0, atol=1e-12) and not torch.allclose(mixer(x), mixer(x, -e))


def correlated_inputs(n=4096, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))


def test_gptq_with_uncorrelated_inputs_is_plain_rounding():
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    q, scale = tg.gptq_quantize(w, torch.diag(torch.rand(96) + 0.5), 31)
    q_round, scale_round = tg.quantize_rows(w, 31)
    assert torch.equal(q, q_round) and torch.equal(scale, scale_round)


def test_gptq_lowers_the_output_error_of_rounding():
    torch.manual_seed(0)
    x, w = correlated_inputs(), torch.randn(48, 96)
    for qmax in (31, 7):
        q, scale = tg.gptq_quantize(w, x.T @ x, qmax)
        q_round, _ = tg.quantize_rows(w, qmax)
        out_err = lambda q: (x @ (w - q.float() * scale.float()[:, None]).T).square().mean()
        assert q.abs().max() <= qmax and out_err(q) < 0.7 * out_err(q_round)  # about 0.5 here


def test_gptq_gives_unused_inputs_zero_weight():
    x = correlated_inputs()
    x[:, 5] = 0
    torch.manual_seed(0)
    q, _ = tg.gptq_quantize(torch.randn(48, 96), x.T @ x, 31)
    assert (q[:, 5] == 0).all() and q.abs().sum() > 0


def test_collect_hessians_sums_each_block_matrix_layers_inputs():
    torch.manual_seed(0)
    model = tg.GPT(small_args(model_dim=256))
    x = torch.randint(0, 1024, (2, 32))
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, tg.CastedLinear):
            m.register_forward_pre_hook(lambda _, inp, name=name: seen.setdefault(name, []).append(inp[0].reshape(-1, inp[0].size(-1))))
    hessians = tg.collect_hessians(model, [x, x.flip(0)])
    expected = {n + ".weight" for n, m in model.named_modules()
                if isinstance(m, tg.CastedLinear) and tg.export_kind(n + ".weight", m.weight) in ("mixer", "mlp")}
    assert set(hessians) == expected and "blocks.0.mixer.dt_proj.weight" not in hessians
    for name, H in hessians.items():
        inputs = torch.cat(seen[name.removesuffix(".weight")])
        assert torch.allclose(H, inputs.T @ inputs, rtol=1e-4, atol=1e-4)


def test_export_with_hessians_quantizes_those_matrices_by_gptq():
    torch.manual_seed(0)
    model = tg.GPT(small_args(model_dim=256))
    unzero_output_projections(model, std=0.05)  # zero-initialised projections would make rounding exact
    hessians = tg.collect_hessians(model, [torch.randint(0, 1024, (2, 64))])
    state = model.state_dict()
    by_gptq, by_rounding = tg.deserialize(tg.serialize(state, BITS, None, hessians)[0]), tg.deserialize(tg.serialize(state, BITS)[0])
    for name, t in state.items():
        if name in hessians:
            q, scale = tg.gptq_quantize(t, hessians[name], 31)
            assert torch.equal(by_gptq[name], q.float() * scale.float()[:, None])
            out_err = lambda r: torch.trace((r - t) @ hessians[name] @ (r - t).T)
            assert out_err(by_gptq[name]) < out_err(by_rounding[name])
        else:
            assert torch.equal(by_gptq[name], by_rounding[name])


def test_gptq_on_a_stack_equals_gptq_on_each_matrix():
    torch.manual_seed(0)
    w = torch.randn(3, 48, 96)
    H = torch.stack([(lambda x: x.T @ x)(correlated_inputs(seed=i)) for i in range(3)])
    H[1, 7] = H[1, :, 7] = 0  # an unused input in one of them
    q, scale = tg.gptq_quantize(w, H, 31)
    for i in range(3):
        q_i, scale_i = tg.gptq_quantize(w[i], H[i], 31)
        assert torch.equal(q[i], q_i) and torch.equal(scale[i], scale_i)
    assert (q[1, :, 7] == 0).all() and (q[0, :, 7] != 0).any()


def test_layer_i_reads_its_normalised_input_scaled_by_one_over_sqrt_i_plus_1():
    torch.manual_seed(0)
    model = tg.GPT(small_args(num_layers=3, ssm_layers=[0, 1, 2]))
    rms = {}
    for i, block in enumerate(model.blocks):
        for part in (block.mixer, block.mlp):
            part.register_forward_pre_hook(lambda m, inp, i=i: rms.setdefault(i, []).append(inp[0].square().mean(-1).sqrt()))
    model(torch.randint(0, 1024, (2, 16)))
    for i in range(3):
        assert all(torch.allclose(r, torch.full_like(r, (i + 1) ** -0.5), rtol=1e-3) for r in rms[i]) and len(rms[i]) == 2
