"""Issue 22: the KDA + MLA + MoE hybrid. The three forms of the KDA core against each other and against transformers'
reference functions, the layer and the whole model against transformers' KimiLinear (both ways), cached decoding
against the full forward, gradients, and the MLA model left exactly as it was when layer_types is absent or all MLA."""
import json

import pytest
import torch

from config import ConfigError, ModelConfig
from generate import generate
from model import (KimiDeltaAttention, LatentCache, SmolLM2DeepSeek, kda_chunked, kda_quadratic, kda_recurrent,
                   l2_normalize)

transformers = pytest.importorskip("transformers")
kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")

from conftest import TINY

LIN, FULL = "linear_attention", "full_attention"
HYBRID = dict(TINY, num_hidden_layers=4, layer_types=[LIN, LIN, FULL, LIN], linear_num_heads=3, linear_head_dim=12,
              linear_conv_kernel_dim=4, max_position_embeddings=512)


def kda_inputs(T, B=2, H=2, dk=16, dv=8, dtype=torch.float64, seed=0, g_low=None):
    """Random core inputs in the layer's layout: q, k L2-normalised, g <= 0 (or down to g_low), beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(B, T, H, dk, generator=gen, dtype=dtype))
    k = l2_normalize(torch.randn(B, T, H, dk, generator=gen, dtype=dtype))
    v = torch.randn(B, T, H, dv, generator=gen, dtype=dtype)
    if g_low is None:
        g = -torch.nn.functional.softplus(torch.randn(B, T, H, dk, generator=gen, dtype=dtype)) * 0.5
    else:
        g = torch.rand(B, T, H, dk, generator=gen, dtype=dtype) * g_low
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    state = torch.randn(B, H, dk, dv, generator=gen, dtype=dtype)
    return q, k, v, g, beta, state


def close(a, b, tol):
    scale = max(b.abs().max().item(), 1.0)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_equals_quadratic_in_fp64(with_state):
    q, k, v, g, beta, state = kda_inputs(37)
    s0 = state if with_state else None
    o1, s1 = kda_recurrent(q, k, v, g, beta, s0)
    o2, s2 = kda_quadratic(q, k, v, g, beta, s0)
    close(o2, o1, 1e-6)
    close(s2, s1, 1e-6)


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(T, with_state):
    q, k, v, g, beta, state = kda_inputs(T, dtype=torch.float32, seed=T)
    s0 = state if with_state else None
    o1, s1 = kda_recurrent(q, k, v, g, beta, s0)
    o2, s2 = kda_chunked(q, k, v, g, beta, s0)
    assert o2.shape == o1.shape == v.shape and s2.shape == s1.shape == (2, 2, 16, 8)
    close(o2, o1, 1e-5)
    close(s2, s1, 1e-5)
    # fp64 says it is the same function, not merely close
    o3, s3 = kda_chunked(*(t.double() for t in (q, k, v, g, beta)), None if s0 is None else s0.double())
    o4, s4 = kda_recurrent(*(t.double() for t in (q, k, v, g, beta)), None if s0 is None else s0.double())
    close(o3, o4, 1e-10)
    close(s3, s4, 1e-10)


@pytest.mark.parametrize("split", [1, 30, 64, 100])
def test_split_invariance(split):
    """A chunk, then the rest from the carried state == the whole sequence at once."""
    q, k, v, g, beta, _ = kda_inputs(150, dtype=torch.float32)
    o_all, s_all = kda_chunked(q, k, v, g, beta)
    first = [t[:, :split] for t in (q, k, v, g, beta)]
    rest = [t[:, split:] for t in (q, k, v, g, beta)]
    o_a, s_a = kda_chunked(*first)
    o_b, s_b = kda_chunked(*rest, s_a)
    close(torch.cat([o_a, o_b], dim=1), o_all, 1e-5)
    close(s_b, s_all, 1e-5)
    o_c, s_c = kda_recurrent(*rest, s_a)  # and the other form continues it the same way
    close(o_c, o_b, 1e-5)


def test_extreme_decays_stay_finite_and_match():
    q, k, v, g, beta, state = kda_inputs(130, dtype=torch.float32, g_low=-800.0)
    g[:, 5:9] = 0.0  # some steps with no decay at all beside ones that wipe the state
    o1, s1 = kda_recurrent(q, k, v, g, beta, state)
    o2, s2 = kda_chunked(q, k, v, g, beta, state)
    o3, s3 = kda_quadratic(q, k, v, g, beta, state)
    for t in (o1, s1, o2, s2, o3, s3):
        assert torch.isfinite(t).all()
    close(o2, o1, 1e-4)  # fp32 with decays from 0 to -800 per step
    close(o3, o1, 1e-4)
    close(s2, s1, 1e-4)


@pytest.mark.parametrize("T", [1, 70])
def test_our_functions_equal_transformers_reference_functions(T):
    gen = torch.Generator().manual_seed(3)
    B, H, dk = 2, 2, 16
    q, k, v = (torch.randn(B, T, H, dk, generator=gen) for _ in range(3))
    g = -torch.rand(B, T, H, dk, generator=gen) * 3
    beta = torch.rand(B, T, H, generator=gen)
    state = torch.randn(B, H, dk, dk, generator=gen)
    ref_o, ref_s = kimi.chunk_kimi_delta_attention(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                                   use_qk_l2norm_in_kernel=True)
    rec_o, rec_s = kimi.recurrent_kimi_delta_attention(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                                       use_qk_l2norm_in_kernel=True)
    qn, kn = l2_normalize(q), l2_normalize(k)
    for ours in (kda_chunked, kda_recurrent):
        o, s = ours(qn, kn, v, g, beta, state)
        close(o, ref_o, 1e-5)
        close(s, ref_s, 1e-5)
        close(o, rec_o, 1e-5)
        close(s, rec_s, 1e-5)


def test_chunked_gradients_match_autograd_through_the_recurrent_form():
    inputs = kda_inputs(70, dtype=torch.float64)
    grads = []
    for form in (kda_recurrent, kda_chunked):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        o, s = form(*leaves)
        weights = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        ((o * weights).sum() + s.pow(2).sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        close(a, b, 1e-9)


# -- the layer and the model against transformers' KimiLinear ------------------------------------------------------

def hf_kimi_config(**overrides):
    values = dict(vocab_size=97, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=4,
                  num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=12, num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                  routed_scaling_factor=1.7, linear_num_heads=3, linear_head_dim=12, linear_conv_kernel_dim=4,
                  layer_types=[LIN, LIN, FULL, LIN], mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    return transformers.KimiLinearConfig(**values)


def randomize(model):
    """Make every tensor matter: random norms, wide weights, non-zero router biases and decay parameters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith("dt_bias"):
                p.normal_(-2, 0.5)
            elif "conv1d" in name:
                p.normal_(0, 0.5)
            elif p.dim() >= 2:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model.eval()


def hybrid(**overrides):
    torch.manual_seed(0)
    return randomize(SmolLM2DeepSeek(ModelConfig.from_dict({**HYBRID, **overrides})))


def test_kda_layer_equals_transformers_with_copied_weights():
    ours = KimiDeltaAttention(ModelConfig.from_dict(HYBRID), 0)
    theirs = kimi.KimiLinearDeltaAttention(hf_kimi_config(), 0)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    randomize(ours)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 70, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = theirs(x)
        for impl in ("chunked", "recurrent"):
            close(ours(x, kda_impl=impl), ref, 1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=12, tie_word_embeddings=True)])
def test_hybrid_loads_in_transformers_with_same_logits_and_greedy_tokens(tmp_path, overrides):
    ours = hybrid(**overrides)
    ours.save_pretrained(str(tmp_path))
    hf_json = json.load(open(tmp_path / "config.json"))
    assert hf_json["model_type"] == "kimi_linear" and hf_json["layer_types"] == HYBRID["layer_types"]
    assert hf_json["mlp_layer_types"] == ["dense", "sparse", "sparse", "sparse"]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                                 output_loading_info=True)
    assert isinstance(hf, transformers.KimiLinearForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert ref.abs().max() > 1.0
    close(got, ref, 1e-4)
    prompt = ids[:1, :17]
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 17:]
    mine = [t.token_id for t in generate(ours, prompt[0].tolist(), max_new_tokens=12, eos_token_id=None)]
    assert mine == theirs.tolist()


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=12, n_group=4, topk_group=2, num_experts_per_tok=3,
                                                  qk_rope_head_dim=3)])
def test_transformers_kimi_linear_loads_with_same_logits_and_saves_back(tmp_path, overrides):
    hf = randomize(transformers.KimiLinearForCausalLM(hf_kimi_config(**overrides)))
    hf.save_pretrained(str(tmp_path / "theirs"))
    ours = SmolLM2DeepSeek.from_pretrained(str(tmp_path / "theirs"))
    assert ours.config.layer_types == [LIN, LIN, FULL, LIN] and not ours.config.tie_word_embeddings
    ids = torch.randint(0, 97, (2, 75), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    close(got, ref, 1e-4)
    # transformers' in-memory names load too (fused experts, one conv1d, the forget gate as a module)
    mem = SmolLM2DeepSeek(ours.config)
    mem.load_hf_state_dict(hf.state_dict())
    with torch.no_grad():
        close(mem.eval()(ids), ref, 1e-4)
    ours.save_pretrained(str(tmp_path / "back"))
    again, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        close(again.eval()(ids).logits, ref, 1e-4)
    prompt = ids[:1, :9]
    theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 9:]
    mine = [t.token_id for t in generate(ours, prompt[0].tolist(), max_new_tokens=10, eos_token_id=None)]
    assert mine == theirs.tolist()


def test_bias_is_written_in_fp32_and_the_head_untied(tmp_path):
    from safetensors.torch import load_file

    ours = hybrid(tie_word_embeddings=True)
    ours.save_pretrained(str(tmp_path), dtype=torch.bfloat16)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" in state and state["lm_head.weight"].dtype == torch.bfloat16
    biases = [k for k in state if k.endswith("e_score_correction_bias")]
    assert biases and all(state[k].dtype == torch.float32 for k in biases)
    assert "model.layers.0.self_attn.q_conv1d.weight" in state and "model.layers.1.block_sparse_moe.experts.0.w1.weight" in state


# -- decoding ------------------------------------------------------------------------------------------------------

def decode_in_pieces(model, ids, pieces):
    cache = LatentCache(model.config, ids.shape[0], ids.shape[1], "cpu", torch.float32)
    outs, pos = [], 0
    for n in pieces:
        outs.append(model.hidden_states(ids[:, pos:pos + n], cache, pos, attn_impl="absorb", expert_impl="sorted"))
        pos += n
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("pieces", [[100], [70, 1, 1, 20, 1, 7], [1] * 12 + [88], [64, 36], [99, 1]])
def test_cached_decoding_equals_the_full_forward(pieces):
    model = hybrid()
    ids = torch.randint(0, 97, (2, 100), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model.hidden_states(ids)
        got, cache = decode_in_pieces(model, ids, pieces)
    close(got, full, 1e-4)
    # the KDA part of the cache does not grow with the context: one [H, dk, dk] state per layer and sequence
    assert cache.state.shape == (3, 2, 3, 12, 12) and cache.conv.shape == (3, 2, 3 * 36, 3)
    assert cache.kv.shape[0] == 1  # latents for the one MLA layer only


def test_prefill_lengths_t_and_t_minus_1_continue_the_same():
    model = hybrid()
    prompt = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    a = [t.token_id for t in generate(model, prompt, max_new_tokens=15, eos_token_id=None)]
    ids = torch.tensor([prompt + a])
    with torch.no_grad():
        logits = model(ids)[0]
    assert a == logits[len(prompt) - 1:-1].argmax(-1).tolist()  # greedy decode == argmax of the full forward
    # decoding from T-1, then feeding token T by itself, then continuing, equals prefilling all T
    with torch.no_grad():
        full, _ = decode_in_pieces(model, ids, [len(prompt) + len(a)])
        split, _ = decode_in_pieces(model, ids, [len(prompt) - 1, 1] + [1] * len(a))
    close(split, full, 1e-4)


def test_routing_and_sampling_work_on_a_hybrid():
    model = hybrid()
    toks = list(generate(model, [1, 2, 3], max_new_tokens=4, temperature=0.8, top_k=5, return_routing=True,
                         eos_token_id=None, generator=torch.Generator().manual_seed(0)))
    assert len(toks) == 4 and all(len(t.routing) == 3 for t in toks)
    assert [layer for layer, _, _ in toks[0].routing] == [1, 2, 3]


def test_hybrid_trains_one_step():
    model = hybrid()
    model.train()
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(8))
    _, loss = model(ids, targets=ids)
    loss.backward()
    kda = model.model.layers[0].self_attn
    for p in (kda.forget_gate.A_log, kda.forget_gate.dt_bias, kda.conv1d.weight, kda.q_proj.weight, kda.o_norm.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# -- config, and the MLA model unchanged -----------------------------------------------------------------------------

def test_all_full_attention_is_todays_model_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    plain = SmolLM2DeepSeek(ModelConfig.from_dict(TINY))
    torch.manual_seed(0)
    listed = SmolLM2DeepSeek(ModelConfig.from_dict({**TINY, "layer_types": [FULL] * 3}))
    assert plain.state_dict().keys() == listed.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), listed.state_dict().values()))
    assert plain.config.to_hf_dict() == listed.config.to_hf_dict()
    assert not any(k in plain.config.to_hf_dict() for k in ("layer_types", "linear_num_heads"))
    plain.save_pretrained(str(tmp_path / "a"))
    listed.save_pretrained(str(tmp_path / "b"))
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(plain(ids), listed(ids))


def test_moonshot_config_and_refusals():
    base = {k: v for k, v in hf_kimi_config().to_dict().items() if k not in ("layer_types",)}
    moon = dict(base, linear_attn_config={"head_dim": 12, "num_heads": 3, "short_conv_kernel_size": 4,
                                          "kda_layers": [1, 2, 4], "full_attn_layers": [3]})
    assert ModelConfig.from_hf_dict(moon).layer_types == [LIN, LIN, FULL, LIN]
    assert ModelConfig.from_hf_dict(base).layer_types == [LIN] * 4  # transformers' default for 4 layers
    with pytest.raises(ConfigError, match="linear_attention"):
        ModelConfig.from_hf_dict(dict(base, layer_types=[FULL] * 4))
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        ModelConfig.from_hf_dict(dict(base, layer_types=[LIN] * 4, mlp_layer_types=["sparse", "dense"] * 2))
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_dict({**TINY, "layer_types": [FULL, "mamba", FULL]})
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_dict({**TINY, "layer_types": [FULL]})
    with pytest.raises(ConfigError, match="n_shared_experts"):
        ModelConfig.from_dict({**HYBRID, "n_shared_experts": 0})


def test_quantize_pack_refuses_a_hybrid_by_name(tmp_path):
    import quantize

    hybrid().save_pretrained(str(tmp_path / "src"))
    with pytest.raises(quantize.HybridNotSupported, match="hybrid"):
        quantize.pack(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert not (tmp_path / "dst" / quantize.QUANTIZED_FILE).exists()


def test_about_shows_the_layer_pattern_of_a_hybrid_only():
    app = pytest.importorskip("app")
    row = app.layer_pattern_row(ModelConfig.from_dict(HYBRID))
    assert "`K K M K`" in row and "layers 2" in row and row.startswith("| Layer pattern |")
    assert app.layer_pattern_row(ModelConfig.from_dict(TINY)) == ""


def test_optimizer_does_not_decay_the_kda_rates():
    from config import TrainConfig
    from train import build_optimizer

    model = hybrid()
    opt = build_optimizer(model, TrainConfig(), torch.device("meta"))
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    kda = model.model.layers[0].self_attn
    assert id(kda.forget_gate.A_log) in no_decay and id(kda.forget_gate.dt_bias) in no_decay
    assert id(kda.q_proj.weight) not in no_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_kda_layer_with_per_row_positions_resumes_only_rows_past_zero():
    """A [B] start_pos (batched decoding): a row at 0 starts from zero state, a row past 0 continues its cache."""
    cfg = ModelConfig.from_dict(HYBRID)
    layer = randomize(KimiDeltaAttention(cfg, 0))
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = layer(x)
        cache = LatentCache(cfg, 2, 9, "cpu", torch.float32)
        solo = LatentCache(cfg, 1, 9, "cpu", torch.float32)
        layer(x[1:, :6], cache=solo, start_pos=0)  # row 1 has 6 tokens behind it
        cache.conv[:, 1:], cache.state[:, 1:] = solo.conv, solo.state
        cache.conv[:, :1].normal_(), cache.state[:, :1].normal_()  # row 0: junk a fresh row must ignore
        out = layer(torch.stack([x[0, :3], x[1, 6:9]]), cache=cache, start_pos=torch.tensor([0, 6]))
    close(out[0], full[0, :3], 1e-5)
    close(out[1], full[1, 6:9], 1e-5)


def test_hybrid_rows_each_at_its_own_position_match_their_own_forward():
    """Batched decoding of a hybrid: rows of 3, 9 and 5 tokens prefilled alone into their views of one cache (junk
    elsewhere), then single tokens and a 2-token chunk with per-row positions give each row's full-forward logits;
    rows() carries the KDA states, move_row copies them."""
    model = hybrid()
    lengths, total = [3, 9, 5], 14
    seqs = [torch.randint(0, 97, (1, total), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        full = [model(s)[0] for s in seqs]
        cache = LatentCache(model.config, 4, total, "cpu", torch.float32)
        for t in (cache.kv, cache.conv, cache.state):
            t.normal_(0, 100.0)
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            model.hidden_states(s[:, :n], cache.rows(b, b + 1), 0)
        pos = torch.tensor(lengths)
        for _ in range(3):
            ids = torch.cat([s[:, int(p):int(p) + 1] for s, p in zip(seqs, pos)])
            logits = model.lm_head(model.hidden_states(ids, cache.rows(0, 3), pos, attn_impl="absorb"))[:, -1]
            for b in range(3):
                close(logits[b], full[b][int(pos[b])], 1e-4)
            pos = pos + 1
        ids = torch.cat([s[:, int(p):int(p) + 2] for s, p in zip(seqs, pos)])
        logits = model.lm_head(model.hidden_states(ids, cache.rows(0, 3), pos, attn_impl="naive"))
        for b in range(3):
            close(logits[b], full[b][int(pos[b]):int(pos[b]) + 2], 1e-4)
    cache.move_row(2, 3, 6)
    assert torch.equal(cache.state[:, 3], cache.state[:, 2]) and torch.equal(cache.conv[:, 3], cache.conv[:, 2])
    cache.rows(1, 2).state.zero_()
    assert cache.state[:, 1].abs().max() == 0 and cache.state[:, 0].abs().max() > 0
