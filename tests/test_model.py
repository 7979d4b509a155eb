"""model.py against transformers' DeepseekV3ForCausalLM, the latent cache, the balancing rule and the config checks."""
import json
import os
import shutil

import pytest
import torch

from config import ConfigError, ModelConfig
from model import SmolLM2DeepSeek, max_violation

transformers = pytest.importorskip("transformers")

from conftest import ROOT, SMOLLM2_GQA_VALUES, TINY, tiny_config


def spread_model(**overrides) -> SmolLM2DeepSeek:
    """A seeded tiny model in eval mode with weights wider than the init (std 0.2), so that a wrong decoding path
    shows in the logits and the greedy tokens."""
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


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


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=12, rope_interleave=False, n_group=2, topk_group=1)])
def test_latent_cache_decoding_matches_full_forward(overrides):
    model = spread_model(**overrides)
    from model import LatentCache

    ids = torch.randint(0, TINY["vocab_size"], (1, 20))
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(model.config, 1, 20, "cpu", torch.float32)
        steps = [model.lm_head(model.hidden_states(ids[:, :8], cache, 0))]  # prefill, expanded form
        steps.append(model.lm_head(model.hidden_states(ids[:, 8:11], cache, 8)))  # 3 tokens, absorbed + mask
        for t in range(11, 20):  # one token at a time, absorbed form
            steps.append(model.lm_head(model.hidden_states(ids[:, t:t + 1], cache, t)))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-4
    assert cache.bytes_per_token_per_layer() == (16 + 4) * 4


def test_generate_greedy_matches_argmax_of_full_forward_and_reports_routing():
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config()).eval()
    prompt = [5, 17, 33, 2]
    out = list(model.generate(prompt, max_new_tokens=6, temperature=0, eos_token_id=None, return_routing=True))
    assert len(out) == 6
    ids = list(prompt)
    for tok in out:
        with torch.no_grad():
            expected = int(model(torch.tensor([ids]))[0, -1].argmax())
        assert tok.token_id == expected
        ids.append(tok.token_id)
        assert [layer for layer, _, _ in tok.routing] == [1, 2]
        for _, experts, weights in tok.routing:
            assert len(experts) == 2 and len(set(experts)) == 2 and all(0 <= e < 8 for e in experts)
            assert sum(weights) == pytest.approx(1.0, abs=1e-5)  # norm_topk_prob with scaling 1


def test_generate_stops_on_eos_and_samples_within_top_k():
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config()).eval()
    first = next(model.generate([1, 2, 3], max_new_tokens=1, temperature=0)).token_id
    assert list(model.generate([1, 2, 3], max_new_tokens=5, temperature=0, eos_token_id=first)) == []
    with torch.no_grad():
        top3 = set(model(torch.tensor([[1, 2, 3]]))[0, -1].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    seen = {next(model.generate([1, 2, 3], 1, temperature=5.0, top_k=3, eos_token_id=None, generator=g)).token_id
            for _ in range(30)}
    assert seen <= top3 and len(seen) > 1
    with pytest.raises(ValueError, match="exceeds the context"):
        list(model.generate([1] * 60, max_new_tokens=10))


def test_chunked_loss_and_gradients_match_plain_cross_entropy():
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config())
    model.loss_chunk_size = 7  # several chunks, the last one partial
    ids = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :3] = -100
    _, loss = model(ids, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = torch.nn.functional.cross_entropy(model(ids).view(-1, 97), targets.view(-1), ignore_index=-100)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n
    model.zero_grad()  # a scaled loss (grad accumulation divides it) scales the precomputed gradients
    (model(ids, targets)[1] * 0.25).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n] * 0.25, p.grad, atol=1e-6), n
    # evaluation (no grad, forms no gradients) on a larger batch: the reused logits buffer grows, values still right
    with torch.no_grad():
        more_ids, more_targets = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
        model.loss_chunk_size = 1024
        eval_loss = model(more_ids, more_targets)[1]
        ref = torch.nn.functional.cross_entropy(model(more_ids).view(-1, 97), more_targets.view(-1))
    assert eval_loss.item() == pytest.approx(ref.item(), abs=1e-5)


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
        with torch.no_grad():
            model.moe_layers[0](x)
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


@pytest.mark.parametrize("bad, message", [
    ({"hidden_sise": 64}, "hidden_sise"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"qk_rope_head_dim": 5}, "qk_rope_head_dim"),
    ({"n_group": 3}, "n_group"),
    ({"rope_interleave": "yes"}, "rope_interleave"),
])
def test_bad_config_names_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**TINY, **bad})


def test_bad_yaml_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 64\n  moe_intermediate_sizee: 12\n")
    with pytest.raises(ConfigError, match="moe_intermediate_sizee"):
        ModelConfig.from_yaml(str(path))
    path.write_text("modle:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match="modle"):
        ModelConfig.from_yaml(str(path))


def test_shipped_configs_load_and_full_model_is_135m_active():
    full = ModelConfig.from_yaml(os.path.join(ROOT, "config_smollm2_135.yaml"))
    with torch.device("meta"):
        counts = SmolLM2DeepSeek(full).count_parameters()
    assert 125e6 <= counts["active"] <= 145e6, counts
    assert counts["total"] > 2 * counts["active"]
    assert full.kv_cache_values_per_token / SMOLLM2_GQA_VALUES <= 0.40
    small = ModelConfig.from_yaml(os.path.join(ROOT, "config_cpu.yaml"))
    assert small.n_routed_experts > 1 and small.num_moe_layers > 0


def test_parameter_cli_prints_counts(capsys, monkeypatch):
    import model as model_module

    monkeypatch.setattr("sys.argv", ["model.py", "--config", os.path.join(ROOT, "config_smollm2_135.yaml")])
    model_module.main()
    out = capsys.readouterr().out
    assert "active" in out and "total" in out and "ratio 0.375" in out


def test_decoding_head_copy_follows_weight_updates():
    model = spread_model()
    prompt = [5, 17, 33, 2]
    first = [t.token_id for t in model.generate(prompt, 5, temperature=0, eos_token_id=None)]
    assert model._decoding_head() is model._decoding_head()  # kept between calls
    with torch.no_grad():  # an in-place update, as an optimizer step makes: the kept copy must not be used
        model.lm_head.weight.normal_(0, 0.5)
    second = [t.token_id for t in model.generate(prompt, 5, temperature=0, eos_token_id=None)]
    ids = list(prompt)
    for tok in second:
        with torch.no_grad():
            assert tok == int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(tok)
    assert second != first


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_decoding_matches_eager_decoding():
    from model import LatentCache

    model = spread_model()
    prompts = [[5, 17, 33, 2], list(range(1, 30))]  # two cache lengths: one dynamic-shape graph serves both
    eager = [[t.token_id for t in model.generate(p, 8, temperature=0, eos_token_id=None)] for p in prompts]
    model.compile_decoding()
    compiled = [[t.token_id for t in model.generate(p, 8, temperature=0, eos_token_id=None)] for p in prompts]
    assert compiled == eager
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():  # the compiled one-token step itself (MoE layers on the gathered-weights path)
        caches = [LatentCache(model.config, 1, 12, "cpu", torch.float32) for _ in range(2)]
        for cache in caches:
            model.hidden_states(ids[:, :11], cache, 0)
        step_eager = model.hidden_states(ids[:, 11:], caches[0], 11)
        step_compiled = model._compiled_step(ids[:, 11:], caches[1], 11)
    assert (step_compiled - step_eager).abs().max().item() <= 1e-5
