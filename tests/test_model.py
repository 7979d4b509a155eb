"""model.py against transformers' DeepseekV3ForCausalLM, the latent cache, the balancing rule and the config checks."""
import json
import os

import pytest
import torch

from model import LatentCache, SmolLM2DeepSeek, max_violation

transformers = pytest.importorskip("transformers")

from conftest import ROOT, TINY, spread_model, tiny_config


def hf_model(**overrides):
    """A random transformers DeepseekV3ForCausalLM with non-trivial router biases and norm weights."""
    values = {**TINY, **overrides}
    theta = values.pop("rope_theta", 10000.0)
    cfg = transformers.DeepseekV3Config(**values, num_key_value_heads=values["num_attention_heads"],
                                        rope_parameters={"rope_type": "default", "rope_theta": theta},
                                        num_mtp_layers=0)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # make every tensor matter: random norms and biases (zeros/ones would hide bugs)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


PARITY_CASES = {
    "plain-q-interleaved": dict(),
    "q-lora": dict(q_lora_rank=12),
    "half-split-rope-group-routing": dict(rope_interleave=False, n_group=4, topk_group=2, num_experts_per_tok=3,
                                          routed_scaling_factor=2.5, norm_topk_prob=True, tie_word_embeddings=False),
    "no-norm-topk": dict(norm_topk_prob=False, rope_theta=100000.0, q_lora_rank=8),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, case):
    hf = hf_model(**PARITY_CASES[case])
    hf.save_pretrained(tmp_path)
    ours = SmolLM2DeepSeek.from_pretrained(str(tmp_path))
    ids = torch.randint(0, TINY["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, 21, TINY["vocab_size"])
    assert ref.abs().max() > 1.0  # the logits are not trivially small
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", PARITY_CASES)
def test_our_checkpoint_loads_in_transformers_with_same_logits(tmp_path, case):
    values = dict(PARITY_CASES[case])
    torch.manual_seed(3)
    ours = SmolLM2DeepSeek(tiny_config(**values)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
        for moe in ours.moe_layers:
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    ours.save_pretrained(str(tmp_path))
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["model_type"] == "deepseek_v3"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_bf16_save_keeps_bias_fp32_and_reloads(tmp_path):
    from safetensors import safe_open

    model = SmolLM2DeepSeek(tiny_config())
    model.moe_layers[0].gate.e_score_correction_bias.fill_(1e-3)
    model.save_pretrained(str(tmp_path), dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight").dtype == torch.bfloat16
    again = SmolLM2DeepSeek.from_pretrained(str(tmp_path))
    assert again.moe_layers[0].gate.e_score_correction_bias[0].item() == pytest.approx(1e-3)


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=12, rope_interleave=False, n_group=2, topk_group=1)])
def test_latent_cache_decoding_matches_full_forward(overrides, attn_impl):
    """Prefill, a 3-token chunk, then single tokens through the latent cache give the full forward's logits, with
    the latents expanded per step ("naive") or attended directly ("absorb")."""
    model = spread_model(**overrides)
    ids = torch.randint(0, TINY["vocab_size"], (1, 20))
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(model.config, 1, 20, "cpu", torch.float32)
        steps = [model.lm_head(model.hidden_states(ids[:, :8], cache, 0, attn_impl=attn_impl))]  # prefill
        steps.append(model.lm_head(model.hidden_states(ids[:, 8:11], cache, 8, attn_impl=attn_impl)))  # + mask
        for t in range(11, 20):  # one token at a time (the one-token expert path)
            h = model.hidden_states(ids[:, t:t + 1], cache, t, attn_impl=attn_impl, expert_impl="direct")
            steps.append(model.lm_head(h))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-4
    assert cache.bytes_per_token_per_layer() == (16 + 4) * 4


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=12, rope_interleave=False)])
def test_ragged_rows_each_at_its_own_position_match_their_own_forward(overrides, attn_impl):
    """Batched decoding: a [B] start_pos puts each row at its own position (rope, cache slot, mask). Rows of 3, 9 and
    5 tokens share one cache whose slots past each row's end hold junk (as a left stream's would); single tokens and
    a 2-token chunk per row then give each row's own full-forward logits. rows()/move_row() are views and copies."""
    model = spread_model(**overrides)
    lengths, total = [3, 9, 5], 14
    seqs = [torch.randint(0, TINY["vocab_size"], (1, total), generator=torch.Generator().manual_seed(i))
            for i in range(3)]
    with torch.no_grad():
        full = [model(s)[0] for s in seqs]  # [total, V] each
        cache = LatentCache(model.config, 4, total, "cpu", torch.float32)
        cache.kv.normal_(0, 100.0)  # junk everywhere a row has not written
        for b, (s, n) in enumerate(zip(seqs, lengths)):  # each row prefilled alone into its view
            model.hidden_states(s[:, :n], cache.rows(b, b + 1), 0)
        pos = torch.tensor(lengths)
        ids = torch.cat([s[:, n:n + 1] for s, n in zip(seqs, lengths)])  # [3, 1]
        for _ in range(3):  # one token per row per step
            h = model.hidden_states(ids, cache.rows(0, 3), pos, attn_impl=attn_impl)
            logits = model.lm_head(h)[:, -1]
            for b in range(3):
                assert (logits[b] - full[b][pos[b]]).abs().max().item() <= 1e-4, (b, int(pos[b]))
            pos = pos + 1
            ids = torch.cat([s[:, int(p):int(p) + 1] for s, p in zip(seqs, pos)])
        ids = torch.cat([s[:, int(p):int(p) + 2] for s, p in zip(seqs, pos)])  # a 2-token chunk per row
        logits = model.lm_head(model.hidden_states(ids, cache.rows(0, 3), pos, attn_impl=attn_impl))
        for b in range(3):
            assert (logits[b] - full[b][int(pos[b]):int(pos[b]) + 2]).abs().max().item() <= 1e-4
        # the scalar path is the per-row path with equal positions
        same = torch.full((3,), 4)
        one = model.hidden_states(ids, cache.rows(0, 3), 4, attn_impl=attn_impl)
        many = model.hidden_states(ids, cache.rows(0, 3), same, attn_impl=attn_impl)
        assert (one - many).abs().max().item() <= 1e-5
    cache.move_row(2, 3, 6)
    assert torch.equal(cache.kv[:, 3, :6], cache.kv[:, 2, :6])
    view = cache.rows(1, 2)
    view.kv.zero_()
    assert cache.kv[:, 1].abs().max() == 0 and cache.kv[:, 0].abs().max() > 0


def test_naive_and_absorbed_attention_agree_without_a_cache():
    model = spread_model()
    attn = model.model.layers[1].self_attn
    x = torch.randn(2, 9, TINY["hidden_size"])
    cos, sin = model.rope_cos[:9], model.rope_sin[:9]
    with torch.no_grad():
        naive, absorb = attn(x, cos, sin, attn_impl="naive"), attn(x, cos, sin, attn_impl="absorb")
    assert (naive - absorb).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="attn_impl"):
        attn(x, cos, sin, attn_impl="flash")


def test_bias_moves_only_through_update_bias_never_the_optimizer():
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config()).train()
    names = [n for n, _ in model.named_parameters()]
    assert not any("e_score_correction_bias" in n for n in names)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 97, (4, 16))
    before = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers]
    for _ in range(3):
        _, loss = model(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(before, model.moe_layers))
    loads = model.expert_loads()
    assert loads.shape == (2, 8) and loads.sum().item() == 3 * 4 * 16 * 2 * 2  # steps*B*T*K*layers
    model.update_bias(loads)
    after = [m.gate.e_score_correction_bias for m in model.moe_layers]
    for b, a, load in zip(before, after, loads):
        delta = a - b
        # overloaded experts go down, underloaded go up, by gamma around a zero mean
        assert torch.all(torch.sign(delta[load > load.mean()]) < 0)
        assert torch.all(torch.sign(delta[load < load.mean()]) > 0)
        assert delta.abs().max().item() <= 2e-3 + 1e-9 and abs(delta.sum().item()) < 1e-6


def test_balancing_brings_max_violation_down_on_a_skewed_router():
    """A router deliberately skewed toward experts 0 and 1; the bias update alone (no training) rebalances it."""
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config(num_hidden_layers=2, bias_update_speed=1e-2)).train()
    base = torch.randn(TINY["hidden_size"])
    with torch.no_grad():
        gate = model.moe_layers[0].gate
        gate.weight.normal_(0, 0.02)
        gate.weight[:2] += 0.3 * base / base.norm()  # tokens near `base` all prefer experts 0 and 1
    x = base + 0.5 * torch.randn(8, 32, TINY["hidden_size"], generator=torch.Generator().manual_seed(1))

    def step_loads():
        model.reset_expert_loads()
        routing = []
        with torch.no_grad():
            model.moe_layers[0](x, routing)
            model.moe_layers[0].gate.count(routing[0][0])  # what a training forward of the model does
        return model.expert_loads()

    first = max_violation(step_loads())[0].item()
    history = []
    for _ in range(300):
        model.update_bias(step_loads())
        history.append(max_violation(model.expert_loads())[0].item())
    last = max_violation(step_loads())[0].item()
    assert first > 2.0  # skewed: the busiest expert gets > 3x its fair share
    settled = sum(history[-50:]) / 50  # averaged: sign updates make single steps jitter around balance
    assert last < first / 3 and settled < first / 4, (first, last, settled)


def test_moe_layer_matches_a_per_token_reference():
    """The sorted, batched expert dispatch equals the paper's equation evaluated token by token."""
    torch.manual_seed(0)
    config = tiny_config()
    model = SmolLM2DeepSeek(config).eval()
    moe = model.moe_layers[0]
    x = torch.randn(1, 10, config.hidden_size)
    with torch.no_grad():
        y = moe(x)[0]
        experts, weights, _, _ = moe.gate(x[0])
        for t in range(10):
            ref = moe.shared_experts(x[0, t])
            for e, g in zip(experts[t].tolist(), weights[t].tolist()):
                gate, up = (moe.experts.gate_up_proj[e] @ x[0, t]).chunk(2)
                ref = ref + g * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
            assert torch.allclose(y[t], ref, atol=1e-5)


def test_parameter_cli_prints_counts(capsys, monkeypatch):
    import model as model_module

    monkeypatch.setattr("sys.argv", ["model.py", "--config", os.path.join(ROOT, "config_smollm2_135.yaml")])
    model_module.main()
    out = capsys.readouterr().out
    assert "active" in out and "total" in out and "ratio 0.375" in out


# ----------------------------------------------------------------------------------------------------------------
# Optional router losses and jitter (off by default): value and gradient, on and off


def router_inputs(model, ids):
    """The input of every MoE layer's gate in a forward of ids (captured by hooks)."""
    seen = []
    hooks = [moe.gate.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
             for moe in model.moe_layers]
    model(ids, ids)
    for h in hooks:
        h.remove()
    return seen


def reference_router_loss(gate, x, B, T, alpha, z_coef):
    """DeepSeek-V3 eq. 17-20 (sequence-wise balance loss) and the router z-loss, written out per sequence."""
    cfg = gate.config
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    logits = x.float() @ gate.weight.float().t()  # [B*T, E]
    scores = logits.sigmoid()
    picked = (scores + gate.e_score_correction_bias).topk(K, dim=-1).indices.view(B, T, K)
    total = 0.0
    for b in range(B):
        f = torch.zeros(E)
        for e in picked[b].flatten().tolist():
            f[e] += E / (K * T)
        s = scores.view(B, T, E)[b]
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        total = total + alpha * (f * p).sum() / B
    return total + z_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()


@pytest.mark.parametrize("alpha, z_coef", [(0.01, 0.0), (0.0, 0.001), (0.01, 0.001)])
def test_router_losses_value_and_gradient(alpha, z_coef):
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    models = {}
    for name, values in [("off", {}), ("on", dict(aux_loss_alpha=alpha, router_z_loss_coef=z_coef))]:
        torch.manual_seed(0)
        models[name] = SmolLM2DeepSeek(tiny_config(**values)).train()
        _, models[name].loss = models[name](ids, ids)
        models[name].loss.backward()
    off, on = models["off"], models["on"]
    inputs = router_inputs(on, ids)
    expected = sum(reference_router_loss(moe.gate, x, 2, 12, alpha, z_coef) for moe, x in zip(on.moe_layers, inputs))
    assert (on.loss - off.loss).item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    assert expected.item() > 0
    # the last router's gradient gains exactly d(its aux loss)/dW (earlier routers also feed later layers' losses)
    for moe_on, moe_off, x in [(on.moe_layers[-1], off.moe_layers[-1], inputs[-1])]:
        gate = moe_on.gate
        saved = gate.weight
        gate.weight = w = torch.nn.Parameter(saved.detach().clone())
        reference_router_loss(gate, x, 2, 12, alpha, z_coef).backward()
        gate.weight = saved
        assert w.grad.abs().sum() > 0
        assert torch.allclose(moe_on.gate.weight.grad - moe_off.gate.weight.grad, w.grad, atol=1e-6)
    # an evaluation forward after a training one carries no router loss (it used to return the stale one)
    with torch.no_grad():
        on.eval(), off.eval()
        assert on(ids, ids)[1].item() == pytest.approx(off(ids, ids)[1].item(), abs=1e-6)


def test_router_jitter_only_in_training():
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    jittery = SmolLM2DeepSeek(tiny_config(router_jitter=0.5))
    torch.manual_seed(0)
    plain = SmolLM2DeepSeek(tiny_config())

    def loss(model, seed):
        torch.manual_seed(seed)
        _, value = model(ids, ids)
        return value.item()

    with torch.no_grad():
        jittery.train(), plain.train()
        assert loss(jittery, 1) != loss(jittery, 2)  # noisy router input: the choices vary between forwards
        assert loss(jittery, 1) == loss(jittery, 1)  # ...drawn from torch's RNG, so a seed repeats them
        assert loss(plain, 1) == loss(plain, 2)  # off: no noise
        jittery.eval(), plain.eval()
        assert loss(jittery, 1) == loss(jittery, 2) == pytest.approx(loss(plain, 1), abs=1e-6)
    jittery.train()
    _, value = jittery(ids, ids)
    value.backward()  # the noise is a constant factor: gradients flow through the router as usual
    assert all(torch.isfinite(moe.gate.weight.grad).all() and moe.gate.weight.grad.abs().sum() > 0
               for moe in jittery.moe_layers)


def test_gradient_checkpointing_counts_loads_once_and_keeps_gradients():
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SmolLM2DeepSeek(tiny_config(aux_loss_alpha=0.01)).train()
        model.gradient_checkpointing = checkpointing
        _, loss = model(ids, ids)
        loss.backward()  # recomputes the blocks when checkpointing
        results.append((loss.item(), model.expert_loads().clone(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, loads_a, grads_a), (loss_b, loads_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert torch.equal(loads_a, loads_b) and loads_a.sum().item() == 2 * 12 * 2 * 2  # B*T*K*layers
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


# ----------------------------------------------------------------------------------------------------------------
# Loading: every damaged or mismatched checkpoint is named


def test_checkpoint_loading_names_what_is_wrong(tmp_path):
    torch.manual_seed(0)
    SmolLM2DeepSeek(tiny_config(num_hidden_layers=4)).save_pretrained(str(tmp_path))
    assert oct(os.stat(tmp_path / "model.safetensors").st_mode & 0o777) == oct(0o666 & ~current_umask())
    config_path = tmp_path / "config.json"
    good = json.loads(config_path.read_text())
    # a config with fewer layers than the weights: the extra layer is not dropped silently
    config_path.write_text(json.dumps({**good, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.3"):
        SmolLM2DeepSeek.from_pretrained(str(tmp_path))
    config_path.write_bytes(b'{"model_type": "deepseek_v3", \xff}')
    with pytest.raises(ValueError, match="config.json is not valid JSON.*not UTF-8"):
        SmolLM2DeepSeek.from_pretrained(str(tmp_path))
    config_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object"):
        SmolLM2DeepSeek.from_pretrained(str(tmp_path))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_expert_dispatch_matches_the_per_expert_loop(dtype):
    """The grouped-GEMM path (the GPU training path) gives the sorted per-expert loop's outputs and gradients,
    with empty experts among them."""
    torch.manual_seed(0)
    experts = SmolLM2DeepSeek(tiny_config()).moe_layers[0].experts.to(dtype)
    x = torch.randn(13, TINY["hidden_size"], dtype=dtype)
    choice = torch.randint(0, 4, (13, 2))  # experts 4-7 get no tokens
    choice[:, 1] = (choice[:, 0] + 1 + torch.randint(0, 3, (13,))) % 4
    weights = torch.rand(13, 2)
    results = {}
    for impl in ("sorted", "grouped"):
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        y = experts(xi, choice, weights, impl)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y))
        results[impl] = (y.float(), xi.grad.float(), experts.gate_up_proj.grad.float(),
                         experts.down_proj.grad.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(results["sorted"], results["grouped"]):
        assert (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item())
    assert results["grouped"][2][4:].abs().sum() == 0  # unused experts get zero gradient


def test_grouped_dispatch_runs_in_the_autocast_dtype():
    """Under autocast the grouped GEMMs take bf16 inputs and weights (the fast GPU kernel's condition); the output
    keeps the residual stream's dtype and stays close to the fp32 result."""
    torch.manual_seed(0)
    experts = SmolLM2DeepSeek(tiny_config()).moe_layers[0].experts
    x = torch.randn(13, TINY["hidden_size"])
    choice = torch.stack([torch.randperm(8)[:2] for _ in range(13)])
    weights = torch.rand(13, 2)
    seen = []
    original = torch.nn.functional.grouped_mm
    try:
        torch.nn.functional.grouped_mm = lambda a, b, **kw: seen.append((a.dtype, b.dtype)) or original(a, b, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = experts(x, choice, weights, "grouped")
    finally:
        torch.nn.functional.grouped_mm = original
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2 and y.dtype == torch.float32
    assert (y - experts(x, choice, weights, "sorted")).abs().max().item() <= 3e-2 * y.abs().max().item()
