"""SmolLM2-DeepSeek: SmolLM2-135M's shape rebuilt with DeepSeek-V3's Multi-head Latent Attention (MLA) and a
Mixture-of-Experts with auxiliary-loss-free load balancing.

One readable file in the spirit of nanoGPT and DeepSeek-V3's inference/model.py. Weights and config.json follow the
Hugging Face `deepseek_v3` format, so `transformers.AutoModelForCausalLM` loads our checkpoints with the same logits.
With `layer_types` (issue 22) some layers are KDA (KimiDeltaAttention, linear attention with a fixed-size state) and
the model is a Kimi Linear hybrid, saved in transformers' `kimi_linear` format.

    from model import SmolLM2DeepSeek, ModelConfig
    model = SmolLM2DeepSeek(ModelConfig.from_yaml("config_smollm2_135.yaml"))
    logits = model(input_ids)                      # [B, T, V]
    _, loss = model(input_ids, targets=targets)    # chunked cross-entropy, no [B, T, V] tensor kept

Generation (sampling, the decode loop, compiled decoding) lives in generate.py, which builds on this module and is
called as `generate(model, prompt_ids, ...)` (this module never imports it), the chunked training loss in loss.py,
config parsing in config.py. Paths are chosen by explicit arguments: `attn_impl` ("naive" expands the latents into
per-head keys and values; "absorb" attends over the latents themselves) and `expert_impl` (how tokens reach experts).

Shapes: B batch, T tokens, d hidden, n heads, dn/dr/dv nope/rope/value head dims, dc latent (kv_lora_rank),
E routed experts, K experts per token, I expert intermediate size, V vocabulary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from config import ConfigError, ModelConfig  # noqa: F401  (ModelConfig is part of model's API)
from loss import ChunkedCrossEntropy, SoftTargets
from quantize import QUANTIZED_FILE, read_quantized

# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics whatever the activation dtype, as transformers does (parity needs the same rounding)
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic in one call (bitwise equal, gradients too): a decode step runs 13 of these, and
            # each of the six calls it replaces costs more in dispatch than in arithmetic
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for each position and rotated pair: two [max_positions, dim // 2] fp32 tables."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate pairs of x [..., T, dr] by position. Interleaved pairs are (x0, x1), (x2, x3), ... (DeepSeek's
    layout); otherwise (x_i, x_{i+dr/2}). The output is always laid out as [rotated firsts | rotated seconds], as in
    transformers; queries and keys share the layout, so their dot products are those of the paper."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    if cos.dtype != x.dtype:  # (a no-op .to still costs a dispatch, 16 per decode step)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LatentCache:
    """Preallocated per-layer cache of MLA's compressed KV: the normalised latent c [dc] and the roped shared key
    kr [dr] for every token, (dc + dr) values per token per layer instead of 2 * n * head_dim. Both live side by
    side in one tensor, so [c | kr] is the absorbed attention's key and c its value without a copy per step."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        L, dc, dr = len(config.mla_layers), config.kv_lora_rank, config.qk_rope_head_dim
        self.kv = torch.zeros(L, batch_size, max_len, dc + dr, device=device, dtype=dtype)  # [L, B, S, dc + dr]
        self.max_len = max_len
        # A hybrid's KDA layers (see KimiDeltaAttention): per layer the short convolution's last (kernel - 1)
        # inputs [B, 3 * H * dk, kernel - 1] and the fp32 recurrent state [B, H, dk, dk], whatever the length.
        n_kda, H, dk = len(config.kda_layers), config.linear_num_heads, config.linear_head_dim
        self.conv = torch.zeros(n_kda, batch_size, 3 * H * dk, config.linear_conv_kernel_dim - 1, device=device,
                                dtype=dtype)
        self.state = torch.zeros(n_kda, batch_size, H, dk, dk, device=device, dtype=torch.float32)

    def bytes_per_token_per_layer(self) -> int:
        return self.kv.shape[-1] * self.kv.element_size()

    def nbytes(self) -> int:
        """Bytes held: the MLA latents of every position plus the KDA layers' fixed-size states."""
        return sum(t.numel() * t.element_size() for t in (self.kv, self.conv, self.state))

    def rows(self, a: int, b: int) -> "LatentCache":
        """Rows a..b-1 as a cache of their own: a view, so what a forward writes there lands in this cache (a
        stream joining a batch is prefilled straight into its row). A hybrid's KDA states come along (batch on
        dim 1, as the latents)."""
        view = LatentCache.__new__(LatentCache)
        view.kv, view.max_len = self.kv[:, a:b], self.max_len
        view.conv, view.state = self.conv[:, a:b], self.state[:, a:b]
        return view

    def move_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy row src's first `length` positions (default: all) into row dst, and its KDA states."""
        length = self.max_len if length is None else length
        self.kv[:, dst, :length] = self.kv[:, src, :length]
        self.conv[:, dst] = self.conv[:, src]
        self.state[:, dst] = self.state[:, src]


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 §2.1): keys and values are rebuilt from a small latent per token."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.dn, self.dr, self.dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.dc = config.kv_lora_rank
        self.interleave = config.rope_interleave
        self.rope = not config.is_hybrid  # a hybrid's MLA is NoPE (Kimi Linear): the rope slice stays unrotated
        self.cache_idx = config.mla_layers.index(layer_idx)  # this layer's slot in LatentCache.kv
        self.scale = config.qk_head_dim ** -0.5
        d, n = config.hidden_size, config.num_attention_heads
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, n * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=1e-6)  # transformers fixes this eps
            self.q_b_proj = nn.Linear(config.q_lora_rank, n * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.dc + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.dc, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.dc, n * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(n * self.dv, d, bias=False)

    def forward(self, x, cos, sin, cache: LatentCache | None = None, start_pos: int | torch.Tensor = 0,
                attn_impl: str = "naive"):
        """x [B, T, d] at positions start_pos.. -> [B, T, d]. With a cache, this call's latents are written into it
        and attention covers every cached position. attn_impl "naive": expand the latents into per-head keys and
        values, then SDPA (training and prefill: T large); "absorb": attend over the latents directly (decoding).
        start_pos may be a [B] tensor (batched decoding of streams of different lengths): row b's tokens sit at
        start_pos[b].., are written to those cache slots and see only the slots before them (cos/sin [B, T, dr/2]).
        A row's slots past its own length may hold anything: they are masked."""
        B, T, _ = x.shape
        rows = torch.is_tensor(start_pos)
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.dn + self.dr).transpose(1, 2)  # [B, n, T, dn+dr]
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.dc, self.dr], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, dc]
        if self.rope:
            q_rope = apply_rope(q_rope, cos.unsqueeze(1) if rows else cos, sin.unsqueeze(1) if rows else sin,
                                self.interleave)
            k_rope = apply_rope(k_rope, cos, sin, self.interleave)  # [B, T, dr]
        future = None
        if rows:
            if cache is None:
                raise ValueError("per-row positions (a start_pos tensor) need a cache")
            positions = start_pos[:, None] + torch.arange(T, device=x.device)  # [B, T]: each row's own slots
            layer = cache.kv[self.cache_idx]
            new_kv = torch.cat([latent, k_rope], dim=-1).to(layer.dtype)
            layer[torch.arange(B, device=x.device)[:, None], positions] = new_kv
            S = int(positions.max()) + 1  # the longest row; a shorter row masks the slots past its own end
            kv = layer[:B, :S]
            future, start_pos = self._future(positions, S), 0  # [B, T, S]
        elif cache is not None:
            cache.kv[self.cache_idx, :B, start_pos:start_pos + T] = torch.cat([latent, k_rope], dim=-1)
            kv = cache.kv[self.cache_idx, :B, :start_pos + T]  # [B, S, dc + dr]: every position so far
        else:
            kv = torch.cat([latent, k_rope], dim=-1) if attn_impl == "absorb" else None
        if attn_impl == "naive":
            if kv is not None:  # re-expand every cached position (what transformers does each decoding step)
                latent, k_rope = kv.split([self.dc, self.dr], dim=-1)
            out = self._expanded(q_nope, q_rope, latent, k_rope, start_pos, future)
        elif attn_impl == "absorb":
            out = self._absorbed(q_nope, q_rope, kv, start_pos, future)
        else:
            raise ValueError(f"attn_impl must be 'naive' or 'absorb', got {attn_impl!r}")
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.dv))

    @staticmethod
    def _future(positions: torch.Tensor, S: int) -> torch.Tensor:
        """True where key slot s lies after query position positions[..., t]: [T, S] for positions [T], [B, T, S]
        for per-row positions [B, T]."""
        return torch.arange(S, device=positions.device) > positions.unsqueeze(-1)

    def _expanded(self, q_nope, q_rope, latent, k_rope, start_pos: int, future: torch.Tensor | None = None):
        """Expand the latents [B, S, dc] of all S visible positions into per-head keys/values, then SDPA. The T
        queries sit at positions start_pos..start_pos+T-1 = the last T of the S keys."""
        B, S, _ = latent.shape
        T = q_nope.shape[2]
        kv = self.kv_b_proj(latent).view(B, S, self.n_heads, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # [B, n, S, dn], [B, n, S, dv]
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, self.n_heads, S, self.dr)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if future is not None:  # per-row positions: [B, T, S], the same mask for every head
            return F.scaled_dot_product_attention(q, k, v, attn_mask=~future.unsqueeze(1), scale=self.scale)
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # [B, n, T, dv]
        mask = None  # one new token sees every cached position
        if T > 1:  # several new tokens: token t may see positions <= start_pos + t
            mask = ~self._future(start_pos + torch.arange(T, device=q.device), S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _absorbed(self, q_nope, q_rope, kv, start_pos: int, future: torch.Tensor | None = None):
        """Fold W_UK into the query and W_UV into the output, so attention runs over the latents directly
        (q_nope . W_UK c = (W_UK^T q_nope) . c) and a cache is never re-expanded per step.

        kv [B, S, dc + dr] holds [c | kr] for every visible position. Every head attends to the same keys (one latent
        per token), so the heads are folded into the rows of a single matmul: [B, n*T, dc+dr] @ [B, dc+dr, S]."""
        B, n, T, _ = q_nope.shape
        S = kv.shape[1]
        w = self.kv_b_proj.weight.view(n, self.dn + self.dv, self.dc)
        w_uk, w_uv = w[:, :self.dn], w[:, self.dn:]  # [n, dn, dc], [n, dv, dc]
        # the batch rows go into the matmul's rows ([n, B*T, dn] @ [n, dn, dc]): broadcasting w_uk over B instead
        # would copy it B times per layer and step (batched decoding)
        q_latent = torch.matmul(q_nope.transpose(0, 1).reshape(n, B * T, self.dn), w_uk)  # [n, B*T, dc]
        q_latent = q_latent.view(n, B, T, self.dc).transpose(0, 1)  # [B, n, T, dc]
        q = torch.cat([q_latent, q_rope], dim=-1).view(B, n * T, self.dc + self.dr)
        scores = torch.matmul(q, kv.transpose(1, 2)).mul_(self.scale)  # [B, n*T, S]
        if future is not None:  # per-row positions: [B, T, S] -> the rows of every head [B, n*T, S]
            scores.masked_fill_(future.repeat(1, n, 1), float("-inf"))
        elif T > 1:  # several new tokens at once: token t may see cache positions <= start_pos + t
            future = self._future(start_pos + torch.arange(T, device=q.device), S)
            scores.masked_fill_(future.repeat(n, 1), float("-inf"))
        o_latent = torch.matmul(scores.softmax(-1), kv[..., :self.dc])  # [B, n*T, dc]
        o_latent = o_latent.view(B, n, T, self.dc).transpose(0, 1).reshape(n, B * T, self.dc)
        out = torch.matmul(o_latent, w_uv.transpose(1, 2))  # [n, B*T, dv]
        return out.view(n, B, T, self.dv).transpose(0, 1)  # [B, n, T, dv]


# ----------------------------------------------------------------------------------------------------------------
# KDA: Kimi Delta Attention (Kimi Linear, Moonshot 2025), the linear-attention layers of a hybrid
#
# Per head, a state S [dk, dv] (a fast-weight memory from keys to values) replaces the growing KV cache. Each token
# first decays S per key channel, then writes with the delta rule (correct what S predicts for k_t by beta_t):
#     S'_t = diag(exp(g_t)) S_{t-1};   S_t = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T;   o_t = S_t^T q_t
# with q, k L2-normalised (q also scaled by dk^-0.5), g_t <= 0 a per-channel log-decay and beta_t in (0, 1).
# Three forms compute the same thing (tests/test_model_kda.py holds them to each other and to transformers'):
# kda_recurrent (one token at a time: decoding), kda_chunked (chunks of C tokens in parallel, a loop over chunks
# only: training and long prefills) and kda_quadratic (the whole sequence as one masked T x T product: tests).
#
# Within a span starting from state S0, with G_t = sum_{s <= t} g_s (per channel) the state unrolls to
#     S_t = diag(exp(G_t)) S0 + sum_{i <= t} diag(exp(G_t - G_i)) k_i u_i^T,
#     u_i = beta_i (v_i - (exp(G_i) * k_i)^T S0) - beta_i sum_{j < i} A'_ij u_j,  A'_ij = k_i . (exp(G_i - G_j) * k_j)
# i.e. (I + diag(beta) A') U = diag(beta) (V - (exp(G) * K) S0): one unit lower-triangular solve per span. The
# exponents G_i - G_j (j <= i) are <= 0; the others are masked to -inf BEFORE exp, so no decay overflows however
# strong (g down to -800 stays finite).

KDA_RECURRENT_MAX_T = 64  # no-grad calls up to this many tokens run the recurrent form (unmeasured choice, see docs)
# The layer's chunk for kda_chunked, by measurement (training steps of config_cpu_hybrid.yaml, batch 4 x 256, 2 CPU
# cores): chunk 64 525 tok/s, 32 941, 16 1219-1308, 8 1406-1460, 4 1370 (the all-MLA twin: 1844-1933). The masked
# decays are [C, C, dk] per chunk, so small chunks cost less than the longer loop over chunks.
KDA_CHUNK_SIZE = 8


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (FLA's and transformers' form: + eps, not max(norm, eps))."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _kda_inputs(q, k, v, g, beta, state, scale):
    """Cast to the compute dtype (fp32, or fp64 when given fp64) and lay out heads first: [B, H, T, D]."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g = (t.to(dtype).transpose(1, 2) for t in (q, k, v, g))
    beta = beta.to(dtype).transpose(1, 2)  # [B, H, T]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, _, dk = k.shape
    if state is None:
        state = torch.zeros(B, H, dk, v.shape[-1], dtype=dtype, device=q.device)
    return q * scale, k, v, g, beta, state.to(dtype)


def kda_recurrent(q, k, v, g, beta, state=None, scale=None):
    """The recurrent form. q, k [B, T, H, dk] (already L2-normalised), v [B, T, H, dv], g [B, T, H, dk] (log-decay,
    <= 0), beta [B, T, H], state [B, H, dk, dv] or None (zeros) -> (o [B, T, H, dv] in q's dtype, final state in the
    compute dtype). One step per token: O(1) in the context length, what decoding needs."""
    out_dtype = q.dtype
    q, k, v, g, beta, S = _kda_inputs(q, k, v, g, beta, state, scale)
    outs = []
    for t in range(q.shape[2]):
        S = S * g[:, :, t].exp().unsqueeze(-1)  # decay each key channel (a row of S)
        k_t = k[:, :, t].unsqueeze(-2)  # [B, H, 1, dk]
        u = (v[:, :, t] - (k_t @ S).squeeze(-2)) * beta[:, :, t, None]  # the delta rule's correction
        S = S + k_t.transpose(-1, -2) * u.unsqueeze(-2)
        outs.append((q[:, :, t].unsqueeze(-2) @ S).squeeze(-2))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape[0], 0, v.shape[1], v.shape[3])
    return o.to(out_dtype), S


def _kda_span(q, k, v, G, beta):
    """The parts of a span (a chunk, or the whole sequence) that do not depend on the incoming state. Inputs
    [..., C, D] with G the within-span cumulative log-decay. Returns the intra-span scores P [..., C, C]
    (P_ti = q_t . (exp(G_t - G_i) * k_i), i <= t), and the solved U0 = (I + A)^-1 beta V and
    W = (I + A)^-1 beta (exp(G) * K), so that U = U0 - W S0 for an incoming state S0."""
    C = q.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf")).exp()  # [.., C, C, dk]
    scores = torch.einsum("...tc,...ic,...tic->...ti", q, k, decay)
    a = torch.einsum("...tc,...ic,...tic->...ti", k, k, decay) * beta.unsqueeze(-1)
    a = a.masked_fill(~causal.tril(-1), 0) + torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v, k * G.exp()], dim=-1) * beta.unsqueeze(-1)
    solved = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
    u0, w = solved.split([v.shape[-1], k.shape[-1]], dim=-1)
    return scores, u0, w


def kda_chunked(q, k, v, g, beta, state=None, scale=None, chunk_size: int = 64):
    """The chunked form (differentiable: training and long prefills), same arguments and results as
    kda_recurrent. Every chunk's intra-chunk work (masked decays, one triangular solve) runs batched; only the
    hand-over of the state from chunk to chunk is a loop, over T / chunk_size chunks."""
    out_dtype = q.dtype
    q, k, v, g, beta, S = _kda_inputs(q, k, v, g, beta, state, scale)
    B, H, T, dk = k.shape
    dv, C = v.shape[-1], chunk_size
    if T == 0:
        return v.new_zeros(B, 0, H, dv).to(out_dtype), S
    pad = (-T) % C  # padded tokens: g 0 (no decay) and beta 0 (no write) leave the state as it is
    N = (T + pad) // C

    def chunks(x):
        return F.pad(x, (0, 0, 0, pad)).view(B, H, N, C, x.shape[-1])

    q, k, v, g = chunks(q), chunks(k), chunks(v), chunks(g)
    beta = F.pad(beta, (0, pad)).view(B, H, N, C)
    G = g.cumsum(-2)
    scores, u0, w = _kda_span(q, k, v, G, beta)
    q_decayed = q * G.exp()  # reads the incoming state, decayed up to each token
    end = G[..., -1:, :]  # [B, H, N, 1, dk]: the decay over the whole chunk
    k_to_end = k * (end - G).exp()  # each write, decayed to the chunk's end
    outs = []
    for n in range(N):
        u = u0[:, :, n] - w[:, :, n] @ S
        outs.append(q_decayed[:, :, n] @ S + scores[:, :, n] @ u)
        S = S * end[:, :, n].exp().transpose(-1, -2) + k_to_end[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).view(B, H, N * C, dv)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), S


def kda_quadratic(q, k, v, g, beta, state=None, scale=None):
    """The quadratic form, for tests: the whole sequence as one span, o = (exp(G) * Q) S0 + P U with the T x T
    masked scores P and U from one T x T triangular solve. Same arguments and results as kda_recurrent."""
    out_dtype = q.dtype
    q, k, v, g, beta, S0 = _kda_inputs(q, k, v, g, beta, state, scale)
    G = g.cumsum(-2)
    scores, u0, w = _kda_span(q, k, v, G, beta)
    u = u0 - w @ S0
    o = (q * G.exp()) @ S0 + scores @ u
    end = G[..., -1:, :]
    S = S0 * end.exp().transpose(-1, -2) + (k * (end - G).exp()).transpose(-1, -2) @ u
    return o.transpose(1, 2).to(out_dtype), S


class GatedRMSNorm(nn.Module):
    """KDA's output norm: RMSNorm over each head's dv values in fp32, times sigmoid(gate)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (x * torch.sigmoid(gate.float())).to(dtype)


class ForgetGate(nn.Module):
    """KDA's per-channel log-decay g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias) <= 0, in fp32. A_log [1, 1, H, 1]
    is one rate per head, dt_bias one bias per channel; f_a -> f_b is a low-rank (dk) projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, dk = config.linear_num_heads, config.linear_head_dim
        self.head_dim = dk
        self.f_a_proj = nn.Linear(config.hidden_size, dk, bias=False)
        self.f_b_proj = nn.Linear(dk, H * dk, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H * dk))
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        raw = (self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()).view(B, T, -1, self.head_dim)
        return -self.A_log.float().exp() * F.softplus(raw)  # [B, T, H, dk]


class KimiDeltaAttention(nn.Module):
    """Kimi Delta Attention (Kimi Linear §2): q/k/v projections, a causal depthwise short convolution + SiLU over
    them, q and k L2-normalised in fp32, the per-channel decay (ForgetGate), beta = sigmoid(b_proj(x)), the delta-rule
    state update (kda_* above), a gated RMSNorm per head, o_proj. Module names are transformers' (kimi_linear), so a
    state dict maps 1:1. A cache keeps, for this layer, the convolution's last inputs and the fp32 state: decoding
    costs the same at every position."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.cache_idx = config.kda_layers.index(layer_idx)  # this layer's slot in LatentCache.conv / .state
        d, H, dk = config.hidden_size, config.linear_num_heads, config.linear_head_dim
        self.n_heads, self.head_dim, self.kernel = H, dk, config.linear_conv_kernel_dim
        D = H * dk
        self.q_proj = nn.Linear(d, D, bias=False)
        self.k_proj = nn.Linear(d, D, bias=False)
        self.v_proj = nn.Linear(d, D, bias=False)
        # one depthwise convolution over [q | k | v] (transformers' conv1d; Moonshot's files split it in three)
        self.conv1d = nn.Conv1d(3 * D, 3 * D, self.kernel, groups=3 * D, bias=False)
        self.forget_gate = ForgetGate(config)
        self.b_proj = nn.Linear(d, H, bias=False)
        self.g_a_proj = nn.Linear(d, dk, bias=False)
        self.g_b_proj = nn.Linear(dk, D, bias=False)
        self.o_norm = GatedRMSNorm(dk, config.rms_norm_eps)
        self.o_proj = nn.Linear(D, d, bias=False)

    def forward(self, x, cos=None, sin=None, cache: LatentCache | None = None, start_pos: int = 0,
                attn_impl: str = "naive", kda_impl: str | None = None):
        """x [B, T, d] -> [B, T, d]; the same call as MLA.forward (cos, sin and attn_impl unused: no rope, one way
        to attend). With a cache, a call at start_pos 0 starts from zero state; later calls continue the cached
        one (the state cannot be rewound: continue where the last call ended); a [B] start_pos decides per row.
        kda_impl: "recurrent", "chunked",
        or None: recurrent for no-grad calls of up to KDA_RECURRENT_MAX_T tokens, chunked otherwise."""
        B, T, _ = x.shape
        H, dk, K = self.n_heads, self.head_dim, self.kernel
        mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).transpose(1, 2)  # [B, 3D, T]
        # per-row positions (a [B] start_pos, batched decoding): rows at 0 start from zero state, the others resume
        fresh = (start_pos == 0) if torch.is_tensor(start_pos) else None
        resume = cache is not None and (fresh is not None or start_pos > 0)
        past = cache.conv[self.cache_idx, :B].to(mixed.dtype) if resume else mixed.new_zeros(B, mixed.shape[1], K - 1)
        if resume and fresh is not None:
            past = past.masked_fill(fresh.view(B, 1, 1), 0)
        mixed = torch.cat([past, mixed], dim=-1)  # [B, 3D, K - 1 + T]: causal, the past (or zeros) on the left
        if cache is not None:
            cache.conv[self.cache_idx, :B] = mixed[:, :, mixed.shape[-1] - (K - 1):]
        mixed = F.silu(F.conv1d(mixed, self.conv1d.weight, groups=mixed.shape[1]))  # [B, 3D, T]
        q, k, v = mixed.transpose(1, 2).reshape(B, T, 3, H, dk).unbind(2)
        q, k = l2_normalize(q.float()), l2_normalize(k.float())
        g = self.forget_gate(x)
        beta = torch.sigmoid(self.b_proj(x))  # [B, T, H]
        state = cache.state[self.cache_idx, :B] if resume else None
        if resume and fresh is not None:
            state = state.masked_fill(fresh.view(B, 1, 1, 1), 0)
        if kda_impl is None:
            grad = torch.is_grad_enabled() and any(p.requires_grad for p in (self.q_proj.weight, self.b_proj.weight))
            kda_impl = "recurrent" if not grad and T <= KDA_RECURRENT_MAX_T else "chunked"
        if kda_impl == "recurrent":
            o, state = kda_recurrent(q, k, v, g, beta, state)
        elif kda_impl == "chunked":
            o, state = kda_chunked(q, k, v, g, beta, state, chunk_size=KDA_CHUNK_SIZE)
        else:
            raise ValueError(f"kda_impl must be 'recurrent', 'chunked' or None, got {kda_impl!r}")
        if cache is not None:
            cache.state[self.cache_idx, :B] = state
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, dk)
        o = self.o_norm(o.to(x.dtype), gate).reshape(B, T, H * dk)
        return self.o_proj(o)


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid top-K router with a selection bias (auxiliary-loss-free balancing, DeepSeek-V3 §2.1.2).

    The bias `e_score_correction_bias` only decides WHICH experts are picked; the weights come from the unbiased
    scores. It is a buffer, not a parameter, so no optimizer can touch it: it moves only through `update_bias`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        # Tokens routed to each expert since the last reset (training forwards): the input of the bias update.
        self.register_buffer("load", torch.zeros(E, dtype=torch.float32), persistent=False)

    def count(self, experts: torch.Tensor) -> None:
        """Add one training forward's choices [N, K] to the loads. A scatter-add on the tensors' device: no host
        sync (bincount would read the maximum back to size its output)."""
        flat = experts.flatten()
        self.load.index_add_(0, flat, torch.ones_like(flat, dtype=self.load.dtype))

    def forward(self, x: torch.Tensor):
        """x [N, d] -> top-K expert ids [N, K], their weights [N, K], and the fp32 router scores and logits."""
        cfg = self.config
        if self.training and cfg.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        logits = F.linear(x.float(), self.weight.float())  # fp32 routing, as DeepSeek-V3
        scores = logits.sigmoid()
        biased = scores + self.e_score_correction_bias  # an fp32 buffer (from_pretrained keeps it fp32)
        if cfg.n_group > 1:  # group-limited routing: keep the topk_group groups with the best top-2 sums
            N, E = biased.shape
            grouped = biased.view(N, cfg.n_group, E // cfg.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices, True)
            biased = biased.masked_fill(~keep.repeat_interleave(E // cfg.n_group, dim=1), float("-inf"))
        experts = biased.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights = weights * cfg.routed_scaling_factor
        return experts, weights, scores, logits

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """b_i += gamma * sign(mean(load) - load_i): underloaded experts become likelier picks. The update is
        centred (as torchtitan does) so the bias does not drift; top-K is unchanged by a shared shift."""
        delta = self.config.bias_update_speed * torch.sign(load.mean() - load.float())
        self.e_score_correction_bias += delta - delta.mean()


class Experts(nn.Module):
    """All routed experts of one layer as two 3-D tensors (transformers' in-memory layout).

    gate_up_proj [E, 2I, d] (gate rows first, then up), down_proj [E, d, I].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, d, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, I))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                impl: str = "sorted") -> torch.Tensor:
        """x [N, d], experts/weights [N, K] -> [N, d] = sum_k weights[:, k] * Expert_{experts[:, k]}(x).

        impl "sorted" (training, prefill): token copies sorted by expert, one matmul per expert over all its tokens,
        outputs scattered back with one index_add; the loop runs over experts, never over tokens.
        "direct" (one decoding token): call its K experts; the sort and scatter would cost more than they do.
        "gather" (one token under torch.compile): the K experts' weights gathered by tensor index, since a
        .tolist() would break the graph and specialise it on every choice of experts.
        "grouped": the sorted dispatch with one grouped GEMM per projection (torch's grouped_mm, group offsets from
        a cumsum on the device): no host sync and no per-expert launches, which is what a GPU step needs."""
        if impl == "sorted":
            return self._sorted(x, experts, weights)
        if impl == "grouped":
            return self._grouped(x, experts, weights)
        if x.shape[0] != 1:
            raise ValueError(f"expert_impl {impl!r} serves one token at a time, got {x.shape[0]}")
        if impl == "direct":
            y = None
            for e, w in zip(experts[0].tolist(), weights[0].tolist()):
                gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
                out = w * F.linear(F.silu(gate) * up, self.down_proj[e])
                y = out if y is None else y.add_(out)
            return y
        if impl == "gather":
            ids, K = experts[0], experts.shape[1]
            gate, up = torch.bmm(self.gate_up_proj[ids], x.expand(K, -1).unsqueeze(-1)).chunk(2, dim=1)  # [K, I, 1]
            out = torch.bmm(self.down_proj[ids], F.silu(gate) * up).squeeze(-1)  # [K, d]
            return (weights[0].unsqueeze(-1).to(x.dtype) * out).sum(0, keepdim=True)
        raise ValueError(f"expert_impl must be 'sorted', 'grouped', 'direct' or 'gather', got {impl!r}")

    def _sorted(self, x, experts, weights):
        N, K = experts.shape
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token_of = order // K  # which token each sorted copy came from
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        xs = x[token_of]  # [N*K, d], grouped by expert
        outs = []
        # unbind, not gate_up_proj[e]: indexing one expert costs a full-size zero gradient per expert in backward
        for xe, w_gate_up, w_down in zip(xs.split(counts), self.gate_up_proj.unbind(0), self.down_proj.unbind(0)):
            if xe.shape[0] == 0:
                continue
            gate, up = F.linear(xe, w_gate_up).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w_down))
        ys = torch.cat(outs) * weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys)

    def _grouped(self, x, experts, weights):
        N, K = experts.shape
        E = self.gate_up_proj.shape[0]
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token_of = order // K
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = counts.cumsum(0, dtype=torch.int32)  # end row of each expert's group
        # autocast does not cover grouped_mm, and its fast CUDA kernel wants bf16 inputs AND weights (fp32 master
        # weights take a slow fallback that copies the offsets to the host): cast both to the autocast dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs = x[token_of].to(dtype)  # [N*K, d], grouped by expert
        w_gate_up, w_down = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        gate, up = F.grouped_mm(xs, w_gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)  # [N*K, I] each
        ys = F.grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offsets)  # [N*K, d]
        ys = ys * weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))


class MoE(nn.Module):
    """y = sum_{i in top-K} g_i Expert_i(x) + SharedExpert(x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor, routing: list | None = None, aux_losses: list | None = None,
                expert_impl: str = "sorted") -> torch.Tensor:
        """Per-call lists rather than module state, so concurrent generations (the app's queue) never see each
        other's routing and no loss outlives its forward: `routing` receives this layer's (expert ids [B, T, K],
        weights [B, T, K]); `aux_losses` the enabled router losses (training only)."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        experts, weights, scores, logits = self.gate(flat)
        if routing is not None:
            routing.append((experts.view(B, T, -1), weights.view(B, T, -1)))
        if self.training and aux_losses is not None:
            loss = self._router_losses(experts, scores, logits, B, T)
            if loss is not None:
                aux_losses.append(loss)
        y = self.experts(flat, experts, weights, expert_impl).view(B, T, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def _router_losses(self, experts, scores, logits, B: int, T: int):
        cfg = self.config
        loss = None
        if cfg.aux_loss_alpha > 0:  # sequence-wise balance loss, DeepSeek-V3 eq. 17-20
            E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
            picked = F.one_hot(experts.view(B, T * K), E).float().sum(1)  # [B, E]
            f = picked * E / (K * T)
            p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)
            loss = cfg.aux_loss_alpha * (f * p).sum(-1).mean()
        if cfg.router_z_loss_coef > 0:
            z = cfg.router_z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
            loss = z if loss is None else loss + z
        return loss


class Block(nn.Module):
    """h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h)), FFN dense for the first layers, MoE after. In a hybrid,
    the layers that config.layer_types marks "linear_attention" use KimiDeltaAttention in place of MLA."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx in config.kda_layers:
            self.self_attn = KimiDeltaAttention(config, layer_idx)
        else:
            self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx < config.first_k_dense_replace:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = MoE(config)

    def forward(self, x, cos, sin, cache=None, start_pos=0, routing=None, aux_losses=None, attn_impl="naive",
                expert_impl="sorted"):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, attn_impl)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(h, routing, aux_losses, expert_impl)
        return x + self.mlp(h)


# ----------------------------------------------------------------------------------------------------------------
# The model


class SmolLM2DeepSeek(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Module names follow transformers' DeepseekV3ForCausalLM so the state dict keys match its checkpoints.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config.qk_rope_head_dim, self._rope_positions(config), config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.loss_fn = ChunkedCrossEntropy(chunk_size=1024)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _rope_positions(config: ModelConfig) -> int:
        """Rows of the rope tables: none for a hybrid (NoPE MLA; its context may be transformers' 1M default)."""
        return 0 if config.is_hybrid else config.max_position_embeddings

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, ForgetGate):  # as FLA and transformers: rates in [1, 16], dt in [1e-3, 1e-1]
            with torch.no_grad():
                module.A_log.copy_(torch.empty_like(module.A_log).uniform_(1.0, 16.0).log())
                dt = torch.empty_like(module.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Gate):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    @property
    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.model.layers if isinstance(block.mlp, MoE)]

    def hidden_states(self, input_ids: torch.Tensor, cache: LatentCache | None = None,
                      start_pos: int | torch.Tensor = 0, routing: list | None = None, aux_losses: list | None = None,
                      attn_impl: str = "naive", expert_impl: str = "sorted"):
        """input_ids [B, T] -> final-normed hidden states [B, T, d]. `routing` collects each MoE layer's
        (experts, weights), `aux_losses` the enabled router losses; attn_impl / expert_impl choose the paths
        (see MLA.forward and Experts.forward). start_pos: an int, or a [B] tensor with a cache (each row at its own
        position: batched decoding of streams of different lengths)."""
        T = input_ids.shape[1]
        end = int(start_pos.max()) + T if torch.is_tensor(start_pos) else start_pos + T
        if end > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {end} tokens exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        if torch.is_tensor(start_pos):
            start_pos = start_pos.to(self.rope_cos.device)
            positions = start_pos[:, None] + torch.arange(T, device=start_pos.device)
            if self.config.is_hybrid:  # NoPE: no tables to index (the MLA layers ignore cos and sin)
                cos, sin = self.rope_cos, self.rope_sin
            else:
                cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B, T, dr/2]
        else:
            cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = self.model.embed_tokens(input_ids)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            args = (x, cos, sin, cache, start_pos, routing, aux_losses, attn_impl, expert_impl)
            # checkpointing keeps only block inputs; activations are recomputed in backward (less memory, ~1.3x
            # compute). The recomputation appends to the lists again, after the caller has read them: harmless.
            x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False) if checkpointing else block(*args)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, expert_impl: str | None = None,
                teacher: SoftTargets | None = None):
        """Without targets: logits [B, T, V]. With targets [B, T] (-100 = ignore): (None, loss), where loss is the
        mean next-token cross-entropy plus any enabled router loss; the full logits are never materialised.
        With `teacher` (loss.SoftTargets over the same B * T tokens) the token loss mixes in KL(teacher || model).
        A training forward adds its routing choices to each gate's load (the input of update_bias).
        expert_impl: see Experts.forward; default "grouped" (one grouped GEMM per projection, no host sync; on a
        2-core CPU also a little faster than "sorted": 5.2-5.4 vs 5.9-6.0 ms fwd+bwd per MoE layer for 512 tokens
        at d 192), "sorted" where grouped_mm cannot take the shapes."""
        if expert_impl is None:
            expert_impl = "grouped" if self._grouped_shapes_ok() else "sorted"
        routing = [] if self.training else None
        aux_losses = [] if self.training else None
        h = self.hidden_states(input_ids, routing=routing, aux_losses=aux_losses, expert_impl=expert_impl)
        if routing:
            with torch.no_grad():
                for moe, (experts, _) in zip(self.moe_layers, routing):
                    moe.gate.count(experts)
        if targets is None:
            return self.lm_head(h)
        B, T, d = h.shape
        loss = self.loss_fn(h.reshape(B * T, d), self.lm_head.weight, targets.reshape(B * T), teacher)
        for aux in aux_losses or []:
            loss = loss + aux
        return None, loss

    def _grouped_shapes_ok(self) -> bool:
        """grouped_mm wants every row stride a multiple of 16 bytes: d and I multiples of 8 cover bf16 and fp32."""
        return self.config.hidden_size % 8 == 0 and self.config.moe_intermediate_size % 8 == 0

    # -- load balancing ------------------------------------------------------------------------------------------
    def expert_loads(self) -> torch.Tensor:
        """Tokens routed to each expert since the last reset: [num MoE layers, E] (fp32 counts)."""
        if not self.moe_layers:
            return torch.zeros(0, self.config.n_routed_experts)
        return torch.stack([moe.gate.load for moe in self.moe_layers])

    def reset_expert_loads(self) -> None:
        for moe in self.moe_layers:
            moe.gate.load.zero_()

    @torch.no_grad()
    def update_bias(self, loads: torch.Tensor | None = None) -> None:
        """Apply the loss-free balancing update once per optimizer step. `loads` [layers, E] must be the step's
        loads summed over all micro-batches and ranks (the trainer all-reduces them); default: the local counts."""
        loads = self.expert_loads() if loads is None else loads
        for moe, load in zip(self.moe_layers, loads):
            moe.gate.update_bias(load.to(moe.gate.e_score_correction_bias.device))

    # -- counting ------------------------------------------------------------------------------------------------
    def count_parameters(self) -> dict:
        """Total parameters and those active per token (all but the routed experts a token does not use)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        routed = sum(moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel() for moe in self.moe_layers)
        cfg = self.config
        active = total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
        return {"total": total, "active": active, "routed_expert": routed,
                "kv_cache_values_per_token_per_layer": cfg.kv_cache_values_per_token}

    # -- Hugging Face format -------------------------------------------------------------------------------------
    def hf_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """State dict with transformers' on-disk keys: experts split into experts.{j}.{gate,up,down}_proj
        (deepseek_v3); a hybrid's in Moonshot's kimi_linear names (what KimiLinearForCausalLM.save_pretrained
        writes: block_sparse_moe, experts.{j}.w1/w3/w2, q/k/v_conv1d, the forget gate's weights on self_attn),
        lm_head.weight always written."""
        out = {}
        hybrid = self.config.is_hybrid
        for key, tensor in self.state_dict().items():
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                if not hybrid:
                    continue
                tensor = tensor.clone()  # KimiLinear never ties: write the head as its own tensor
            keep_fp32 = key.endswith("e_score_correction_bias")
            t = tensor.detach().to(torch.float32 if keep_fp32 or dtype is None else dtype)
            if key.endswith("experts.gate_up_proj"):
                prefix = key[: -len("gate_up_proj")]
                for j, w in enumerate(t):
                    gate, up = w.chunk(2, dim=0)
                    out[f"{prefix}{j}.gate_proj.weight"] = gate.contiguous()
                    out[f"{prefix}{j}.up_proj.weight"] = up.contiguous()
            elif key.endswith("experts.down_proj"):
                prefix = key[: -len("down_proj")]
                for j, w in enumerate(t):
                    out[f"{prefix}{j}.down_proj.weight"] = w.contiguous()
            else:
                out[key] = t.contiguous()
        return kimi_disk_names(out) if hybrid else out

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> None:
        """Write config.json, generation_config.json and model.safetensors in transformers' deepseek_v3 format (a
        hybrid: kimi_linear)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        hf = self.config.to_hf_dict()
        hf["dtype"] = str(dtype or self.lm_head.weight.dtype).replace("torch.", "")
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        with open(os.path.join(directory, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id,
                       "pad_token_id": self.config.pad_token_id, "do_sample": True, "temperature": 0.8,
                       "top_k": 50}, f, indent=2)
        weights = os.path.join(directory, "model.safetensors")
        save_file(self.hf_state_dict(dtype), weights, metadata={"format": "pt"})
        # safetensors writes through a private temp file (mode 0600); give it the mode of every other file here so
        # an app running as another user can read it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(weights, 0o666 & ~umask)

    @classmethod
    def from_pretrained(cls, directory: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "SmolLM2DeepSeek":
        """Load a checkpoint written by save_pretrained or by transformers' DeepseekV3ForCausalLM or
        KimiLinearForCausalLM (Moonshot's on-disk names or transformers' in-memory ones)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in checkpoint directory {directory!r}")
        try:
            with open(config_path, encoding="utf-8") as f:
                hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_path} is not valid JSON (truncated, corrupt or not UTF-8?): {err}") from None
        config = ModelConfig.from_hf_dict(hf, where=config_path)
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(directory, QUANTIZED_FILE)) and \
                not os.path.isfile(os.path.join(directory, "model.safetensors")):
            files = [QUANTIZED_FILE]  # quantize.py's small storage, dequantized here once
        else:
            files = ["model.safetensors"]
        state = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"missing weights file {path}")
            try:
                state.update(read_quantized(path) if name == QUANTIZED_FILE else load_file(path))
            except (SafetensorError, OSError, ValueError) as err:
                raise ValueError(f"cannot read weights file {path} (truncated or corrupt?): {err}") from None
        with torch.device("meta"):
            model = cls(config)
        mtp_layers = int(hf.get("num_nextn_predict_layers") or 0)
        model.load_hf_state_dict(state, source=directory, extra_layers=mtp_layers)
        model.rope_cos, model.rope_sin = rope_tables(config.qk_rope_head_dim, cls._rope_positions(config),
                                                     config.rope_theta)
        for moe in model.moe_layers:
            moe.gate.load = torch.zeros(config.n_routed_experts)
        model.to(device=device, dtype=dtype)
        for moe in model.moe_layers:  # the balancing bias stays fp32 whatever the weights' dtype
            moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.data.float()
        return model.eval()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict",
                           extra_layers: int = 0) -> None:
        """Load transformers-format tensors (per-expert keys or fused 3-D ones) into this model. `extra_layers`:
        DeepSeek checkpoints may carry multi-token-prediction layers after the last one (config.json's
        num_nextn_predict_layers); their weights are skipped. Any other weight without a place is an error."""
        cfg = self.config
        state = kimi_our_names(state, cfg) if cfg.is_hybrid else dict(state)
        for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp.experts."
            if prefix + "gate_up_proj" in state:
                continue  # already fused
            try:
                gate_up, down = [], []
                for j in range(cfg.n_routed_experts):
                    g = state.pop(f"{prefix}{j}.gate_proj.weight")
                    u = state.pop(f"{prefix}{j}.up_proj.weight")
                    gate_up.append(torch.cat([g, u], dim=0))
                    down.append(state.pop(f"{prefix}{j}.down_proj.weight"))
            except KeyError as err:
                raise ValueError(f"{source}: missing expert weight {err.args[0]}") from None
            state[prefix + "gate_up_proj"] = torch.stack(gate_up)
            state[prefix + "down_proj"] = torch.stack(down)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
            state["lm_head.weight"] = state.get("model.embed_tokens.weight")
        expected = self.state_dict()
        missing = sorted(k for k in expected if k not in state or state[k] is None)
        mtp = tuple(f"model.layers.{cfg.num_hidden_layers + i}." for i in range(extra_layers))
        unexpected = sorted(k for k in state if k not in expected and not (mtp and k.startswith(mtp)))
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not match the config; missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for key, tensor in expected.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
        self.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


_SPLIT_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_MOONSHOT_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.experts\.(\d+)\.w([123])\.weight$")
_FORGET_GATE = ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log")
_EXPERT_W = {"gate": "w1", "down": "w2", "up": "w3"}
_EXPERT_PROJ = {w: proj for proj, w in _EXPERT_W.items()}


def kimi_disk_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our hybrid's HF-style keys (experts already split per expert) -> the names KimiLinear checkpoints use on
    disk (transformers converts them to its in-memory layout at load)."""
    out = {}
    for key, t in state.items():
        m = _SPLIT_EXPERT_KEY.match(key)
        if m:
            out[f"{m[1]}block_sparse_moe.experts.{m[2]}.{_EXPERT_W[m[3]]}.weight"] = t
            continue
        if key.endswith(".self_attn.conv1d.weight"):
            prefix = key[: -len("conv1d.weight")]
            for name, part in zip("qkv", t.chunk(3, dim=0)):
                out[f"{prefix}{name}_conv1d.weight"] = part.contiguous()
            continue
        key = key.replace(".self_attn.forget_gate.", ".self_attn.").replace(".mlp.", ".block_sparse_moe.")
        out[key] = t
    return out


def kimi_our_names(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A kimi_linear state dict in Moonshot's on-disk names (or already in transformers' in-memory ones: those pass
    through) -> ours, with experts left per expert (gate_proj / up_proj / down_proj) or fused, as given."""
    out, convs = {}, {}
    for key, t in state.items():
        m = _MOONSHOT_EXPERT_KEY.match(key)
        if m:
            key = f"{m[1]}mlp.experts.{m[2]}.{_EXPERT_PROJ['w' + m[3]]}_proj.weight"
        key = key.replace(".block_sparse_moe.", ".mlp.")
        for name in _FORGET_GATE:
            if key.endswith(".self_attn." + name):
                key = key[: -len(name)] + "forget_gate." + name
        for name in "qkv":
            if key.endswith(f".self_attn.{name}_conv1d.weight"):
                convs.setdefault(key[: -len(f"{name}_conv1d.weight")], {})[name] = t
                break
        else:
            out[key] = t
    for prefix, parts in convs.items():
        if set(parts) != set("qkv"):
            raise ValueError(f"{prefix}: q_conv1d, k_conv1d and v_conv1d must all be present, got {sorted(parts)}")
        out[prefix + "conv1d.weight"] = torch.cat([parts[n] for n in "qkv"], dim=0)
    H = config.linear_num_heads
    for key, t in out.items():  # one decay rate per head, whatever shape a file gives it
        if key.endswith("forget_gate.A_log") and t.numel() == H:
            out[key] = t.reshape(1, 1, H, 1)
    return out


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer (Wang et al. 2024): (max_i c_i - mean c) / mean c for loads [layers, E]."""
    mean = loads.float().mean(-1)
    return (loads.float().max(-1).values - mean) / mean.clamp(min=1e-9)


def main():
    parser = argparse.ArgumentParser(description="Print a config's parameter counts and KV-cache size.")
    parser.add_argument("--config", default="config_smollm2_135.yaml")
    args = parser.parse_args()
    config = ModelConfig.from_yaml(args.config)
    with torch.device("meta"):
        counts = SmolLM2DeepSeek(config).count_parameters()
    values = config.kv_cache_values_per_token
    gqa = 2 * 3 * 64  # SmolLM2-135M: 3 kv heads of 64 dims, keys and values
    print(f"{args.config}: total {counts['total'] / 1e6:.2f}M parameters, active {counts['active'] / 1e6:.2f}M "
          f"per token ({config.n_routed_experts} routed experts, top-{config.num_experts_per_tok}, "
          f"{config.n_shared_experts} shared)")
    print(f"KV cache: {values} values per token per layer ({values * 4} bytes fp32, {values * 2} bytes bf16); "
          f"SmolLM2 GQA caches {gqa}: ratio {values / gqa:.3f}")
    if config.is_hybrid:
        mla, kda = len(config.mla_layers), len(config.kda_layers)
        print(f"hybrid: {kda} KDA layers, {mla} MLA layers (NoPE) at {config.mla_layers}; the cache grows by "
              f"{mla * values} values per token ({mla}/{config.num_hidden_layers} of all-MLA's) plus "
              f"{kda} x {config.kda_state_values} fixed KDA state values per sequence")


if __name__ == "__main__":
    main()
