"""SmolLM2-DeepSeek: SmolLM2-135M's shape rebuilt with DeepSeek-V3's Multi-head Latent Attention (MLA) and a
Mixture-of-Experts with auxiliary-loss-free load balancing.

One readable file in the spirit of nanoGPT and DeepSeek-V3's inference/model.py. Weights and config.json follow the
Hugging Face `deepseek_v3` format, so `transformers.AutoModelForCausalLM` loads our checkpoints with the same logits.

    from model import SmolLM2DeepSeek, ModelConfig
    model = SmolLM2DeepSeek(ModelConfig.from_yaml("config_smollm2_135.yaml"))
    logits = model(input_ids)                      # [B, T, V]
    _, loss = model(input_ids, targets=targets)    # chunked cross-entropy, no [B, T, V] tensor kept
    for step in model.generate(prompt_ids, max_new_tokens=64, temperature=0.8, top_k=50, return_routing=True): ...

Shapes: B batch, T tokens, d hidden, n heads, dn/dr/dv nope/rope/value head dims, dc latent (kv_lora_rank),
E routed experts, K experts per token, I expert intermediate size, V vocabulary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from config import ConfigError, ModelConfig  # noqa: F401  (ModelConfig is part of model's API)

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
        if dtype != torch.float32:
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x if dtype == torch.float32 else x.to(dtype))


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
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LatentCache:
    """Preallocated per-layer cache of MLA's compressed KV: the normalised latent c [dc] and the roped shared key
    kr [dr] for every token, (dc + dr) values per token per layer instead of 2 * n * head_dim. Both live side by
    side in one tensor, so [c | kr] is the absorbed attention's key and c its value without a copy per step."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        L, dc, dr = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
        self.kv = torch.zeros(L, batch_size, max_len, dc + dr, device=device, dtype=dtype)  # [L, B, S, dc + dr]
        self.max_len = max_len

    def bytes_per_token_per_layer(self) -> int:
        return self.kv.shape[-1] * self.kv.element_size()


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 §2.1): keys and values are rebuilt from a small latent per token."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.dn, self.dr, self.dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.dc = config.kv_lora_rank
        self.interleave = config.rope_interleave
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

    def forward(self, x, cos, sin, cache: LatentCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.dn + self.dr).transpose(1, 2)  # [B, n, T, dn+dr]
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, self.interleave)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.dc, self.dr], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, dc]
        k_rope = apply_rope(k_rope, cos, sin, self.interleave)  # [B, T, dr]
        if cache is not None:
            cache.kv[self.layer_idx, :B, start_pos:start_pos + T] = torch.cat([latent, k_rope], dim=-1)
        if cache is None or start_pos == 0:
            out = self._expanded(q_nope, q_rope, latent, k_rope)
        else:
            out = self._absorbed(q_nope, q_rope, cache.kv[self.layer_idx, :B, :start_pos + T], start_pos)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.dv))

    def _expanded(self, q_nope, q_rope, latent, k_rope):
        """Training and prefill: expand the latents into per-head keys/values once, then causal SDPA."""
        B, T, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, T, self.n_heads, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # [B, n, T, dn], [B, n, T, dv]
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, self.n_heads, T, self.dr)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # [B, n, T, dv]

    def _absorbed(self, q_nope, q_rope, kv, start_pos: int):
        """Decode: fold W_UK into the query and W_UV into the output, so attention runs over the cached latents
        directly (q_nope . W_UK c = (W_UK^T q_nope) . c) and the cache is never re-expanded per step.

        kv [B, S, dc + dr] is the cache ([c | kr] per position). Every head attends to the same keys (one latent
        per token), so the heads are folded into the rows of a single matmul: [B, n*T, dc+dr] @ [B, dc+dr, S]."""
        B, n, T, _ = q_nope.shape
        S = kv.shape[1]
        w = self.kv_b_proj.weight.view(n, self.dn + self.dv, self.dc)
        w_uk, w_uv = w[:, :self.dn], w[:, self.dn:]  # [n, dn, dc], [n, dv, dc]
        q = torch.cat([torch.matmul(q_nope, w_uk), q_rope], dim=-1).view(B, n * T, self.dc + self.dr)
        scores = torch.matmul(q, kv.transpose(1, 2)).mul_(self.scale)  # [B, n*T, S]
        if T > 1:  # several new tokens at once: token t may see cache positions <= start_pos + t
            future = torch.arange(S, device=q.device) > (start_pos + torch.arange(T, device=q.device))[:, None]
            scores.masked_fill_(future.repeat(n, 1), float("-inf"))
        o_latent = torch.matmul(scores.softmax(-1), kv[..., :self.dc])  # [B, n*T, dc]
        return torch.matmul(o_latent.view(B, n, T, self.dc), w_uv.transpose(1, 2))  # [B, n, T, dv]


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
        # Tokens routed to each expert since the last reset (training only): the input of the bias update.
        self.register_buffer("load", torch.zeros(E, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor):
        """x [N, d] -> top-K expert ids [N, K], their weights [N, K], and the fp32 router scores and logits."""
        cfg = self.config
        if self.training and cfg.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        logits = F.linear(x.float(), self.weight.float())  # fp32 routing, as DeepSeek-V3
        scores = logits.sigmoid()
        biased = scores + self.e_score_correction_bias.float()
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
        weights = weights * cfg.routed_scaling_factor
        if self.training and not _in_backward():  # gradient checkpointing re-runs this in backward: count once
            with torch.no_grad():
                self.load += torch.bincount(experts.flatten(), minlength=cfg.n_routed_experts).float()
        return experts, weights, scores, logits

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """b_i += gamma * sign(mean(load) - load_i): underloaded experts become likelier picks. The update is
        centred (as torchtitan does) so the bias does not drift; top-K is unchanged by a shared shift."""
        delta = self.config.bias_update_speed * torch.sign(load.mean() - load.float())
        self.e_score_correction_bias += delta - delta.mean()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Experts(nn.Module):
    """All routed experts of one layer as two 3-D tensors (transformers' in-memory layout).

    gate_up_proj [E, 2I, d] (gate rows first, then up), down_proj [E, d, I].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, d, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, I))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d], experts/weights [N, K] -> [N, d]. Token copies are sorted by expert so each expert does one
        contiguous matmul over all its tokens; outputs are scattered back with one index_add. The loop runs over
        experts (E matmuls), never over tokens (torch._grouped_mm would make it one call, but its backward fails
        on CPU in torch 2.13)."""
        N, K = experts.shape
        if N == 1 and not torch.is_grad_enabled() and torch.compiler.is_compiling():
            # decoding one token, traced by compile_decoding: the K experts' weights are gathered by tensor index
            # (a .tolist() would break the graph and specialise it on every choice of experts)
            ids = experts[0]
            gate, up = torch.bmm(self.gate_up_proj[ids], x.expand(K, -1).unsqueeze(-1)).chunk(2, dim=1)  # [K, I, 1]
            out = torch.bmm(self.down_proj[ids], F.silu(gate) * up).squeeze(-1)  # [K, d]
            return (weights[0].unsqueeze(-1).to(x.dtype) * out).sum(0, keepdim=True)
        if N == 1 and not torch.is_grad_enabled():
            # decoding one token eagerly: call its K experts directly; the sort/scatter below costs more than they do
            y = torch.zeros_like(x)
            for e, w in zip(experts[0].tolist(), weights[0].tolist()):
                gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
                y += w * F.linear(F.silu(gate) * up, self.down_proj[e])
            return y
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


class MoE(nn.Module):
    """y = sum_{i in top-K} g_i Expert_i(x) + SharedExpert(x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)
        self.aux_loss = None  # set in training when an optional router loss is on

    def forward(self, x: torch.Tensor, routing: list | None = None) -> torch.Tensor:
        """`routing`, when given, receives this layer's (expert ids [B, T, K], weights [B, T, K]): a per-call list
        rather than module state, so concurrent generations (the app's queue) never see each other's routing."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        experts, weights, scores, logits = self.gate(flat)
        if routing is not None:
            routing.append((experts.view(B, T, -1), weights.view(B, T, -1)))
        if self.training:
            self.aux_loss = self._router_losses(experts, scores, logits, B, T)
        y = self.experts(flat, experts, weights).view(B, T, d)
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
    """h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h)), FFN dense for the first layers, MoE after."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx < config.first_k_dense_replace:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = MoE(config)

    def forward(self, x, cos, sin, cache=None, start_pos=0, routing=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, routing) if isinstance(self.mlp, MoE) else self.mlp(h))


# ----------------------------------------------------------------------------------------------------------------
# Loss


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (h @ W^T) computed chunk by chunk: the [N, V] logits (V = 49152) are never held at once.

    The gradients are formed in the forward pass, chunk by chunk (softmax - onehot), so the backward pass is just
    a scale. Same FLOPs as the plain version; peak memory drops from N*V to chunk*V floats.

    Speed (bench/bench_train.py): the logits are laid out vocab-major, [V, chunk] = W @ h^T. With d = 192 the three
    lm_head GEMMs are thin, and MKL runs the vocab-major forms (W @ h^T, P @ h, P^T @ W) ~1.3x faster on this CPU
    than the token-major ones. The softmax is written out as five in-place passes (max, sub, exp, sum, scale) over
    the one buffer: torch's fused log_softmax over dim 0 is 4x slower, and logsumexp allocates temporaries.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, workspace: torch.Tensor | None = None,
                grad_enabled: bool = True):
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        scale = valid.float() / n_valid  # d(mean loss)/d(token loss); 0 for ignored tokens
        safe_targets = targets.clamp(min=0)
        # needs_input_grad is True under no_grad too, so the caller says whether a backward can follow (evaluation
        # would otherwise pay for the two gradient GEMMs it never uses)
        needs_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.empty_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start:start + chunk_size]
            tc = safe_targets[start:start + chunk_size].unsqueeze(0)  # [1, c]
            sc = scale[start:start + chunk_size]
            if workspace is not None:  # [V, c] view of the caller's reused buffer
                logits = torch.mm(weight, hc.t(), out=workspace[:weight.shape[0] * hc.shape[0]].view(-1, hc.shape[0]))
            else:
                logits = (weight.to(h.dtype) @ hc.t()).float()  # [V, c]
            target_logit = logits.gather(0, tc).squeeze(0)
            peak = logits.amax(0)
            # exp(z - peak) in place, in row blocks of ~4 MB that stay in cache while they are shifted,
            # exponentiated and summed: one pass over the [V, c] buffer from memory instead of three
            sums = torch.zeros_like(peak)
            rows = max(1, (1 << 20) // logits.shape[1])
            for block in logits.split(rows):
                sums += block.sub_(peak).exp_().sum(0)
            total += ((peak + sums.log() - target_logit) * sc).sum()
            if needs_grad:
                # d loss / d z = (exp(z - peak) / sums - onehot) * scale. The per-token factor scale / sums goes into
                # the small [c, d] operands of the GEMMs, not over the [V, c] buffer: (E diag(f)) h = E (diag(f) h);
                # the one-hot term touches only the target rows.
                f = (sc / sums).unsqueeze(1)  # [c, 1]
                hf = hc.float()
                grad_h[start:start + chunk_size] = ((logits.t().to(h.dtype) @ weight.to(h.dtype)) * f
                                                    - sc.unsqueeze(1) * weight[tc[0]].to(h.dtype))
                if start == 0:
                    torch.mm(logits, hf * f, out=grad_w)
                else:
                    grad_w.addmm_(logits, hf * f)
                grad_w.index_add_(0, tc[0], hf * -sc.unsqueeze(1))
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # in place: a copy of grad_w would be another 37 MB allocation (the version counter still stops a second
        # backward through the same graph from reusing the scaled tensors)
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class GeneratedToken:
    """One streamed token. `routing` (when asked for) has one entry per MoE layer: (layer index, expert ids, weights)."""

    token_id: int
    routing: list[tuple[int, list[int], list[float]]] | None = None


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
        cos, sin = rope_tables(config.qk_rope_head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.loss_chunk_size = 1024
        self._head_t, self._head_key = None, None  # see _decoding_head
        self._loss_buffer = None  # see _logits_workspace
        self._compiled_step = None  # see compile_decoding
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.initializer_range
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

    def hidden_states(self, input_ids: torch.Tensor, cache: LatentCache | None = None, start_pos: int = 0,
                      routing: list | None = None):
        """input_ids [B, T] -> final-normed hidden states [B, T, d]. `routing` collects each MoE layer's choice."""
        T = input_ids.shape[1]
        if start_pos + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # keep only block inputs; activations are recomputed in backward (less memory, ~1.3x compute)
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, start_pos, routing)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        """Without targets: logits [B, T, V]. With targets [B, T] (-100 = ignore): (None, loss), where loss is the
        mean next-token cross-entropy plus any enabled router loss; the full logits are never materialised."""
        h = self.hidden_states(input_ids)
        if targets is None:
            return self.lm_head(h)
        B, T, d = h.shape
        loss = LinearCrossEntropy.apply(h.reshape(B * T, d), self.lm_head.weight, targets.reshape(B * T),
                                        self.loss_chunk_size,
                                        self._logits_workspace(h, min(B * T, self.loss_chunk_size)),
                                        torch.is_grad_enabled())
        for moe in self.moe_layers:
            if moe.aux_loss is not None:
                loss = loss + moe.aux_loss
        return None, loss

    def _logits_workspace(self, h: torch.Tensor, columns: int) -> torch.Tensor | None:
        """A flat fp32 buffer for the loss's [V, chunk] logits, kept between steps on CPU. glibc hands a freed block
        this large (100 MB for 512 tokens) back to the OS, so a fresh one per step page-faults back in and made the
        first lm_head GEMM 2x slower (130 vs 65 ms). CUDA's caching allocator already reuses its blocks."""
        w = self.lm_head.weight
        if not (h.device.type == "cpu" and h.dtype == w.dtype == torch.float32):
            return None
        needed = w.shape[0] * columns
        if self._loss_buffer is None or self._loss_buffer.numel() < needed:
            self._loss_buffer = torch.empty(needed)
        return self._loss_buffer

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

    # -- generation ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 eos_token_id: int | None = -1, return_routing: bool = False,
                 generator: torch.Generator | None = None) -> Iterator[GeneratedToken]:
        """Stream up to max_new_tokens tokens after prompt_ids (a list of ints or a [1, T] tensor).

        temperature 0 = greedy; top_k 0 (or >= vocab) = no top-k filter; stops after eos (not yielded). The prompt
        is prefilled in one pass (expanded MLA); each new token then attends over the latent cache (absorbed MLA).
        """
        cfg = self.config
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).view(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token")
        if max_new_tokens < 0 or temperature < 0 or top_k < 0:
            raise ValueError("max_new_tokens, temperature and top_k must be >= 0")
        if ids.shape[1] + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                             f"{cfg.max_position_embeddings} tokens")
        eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        was_training = self.training
        self.eval()
        device = self.lm_head.weight.device
        ids = ids.to(device)
        cache = LatentCache(cfg, 1, ids.shape[1] + max_new_tokens, device, self.lm_head.weight.dtype)
        head = self._decoding_head()
        first_moe = cfg.first_k_dense_replace
        try:
            pos, step_ids = 0, ids
            for _ in range(max_new_tokens):
                layers = [] if return_routing else None
                if self._compiled_step is not None and step_ids.shape[1] == 1 and not return_routing:
                    h = self._compiled_step(step_ids, cache, pos)
                else:
                    h = self.hidden_states(step_ids, cache, pos, layers)
                logits = (h[0, -1] @ head).float()  # [V]
                token = self._sample(logits, temperature, top_k, generator)
                if eos is not None and token == eos:
                    return
                routing = None
                if return_routing:
                    # the routing that produced this token: the last input position of every MoE layer
                    routing = [(first_moe + i, experts[0, -1].tolist(), weights[0, -1].tolist())
                               for i, (experts, weights) in enumerate(layers)]
                yield GeneratedToken(token, routing)
                pos += step_ids.shape[1]
                step_ids = torch.tensor([[token]], device=device)
        finally:
            self.train(was_training)

    def compile_decoding(self) -> None:
        """From now on generate() runs each one-token step through torch.compile (inductor, dynamic shapes: one
        graph for every position and cache length). Eagerly, a step is ~1500 small ATen calls (norms, rope, the
        absorbed attention, routing) whose per-call overhead outweighs their arithmetic at this size; inductor fuses
        them into a few C++ loops around the GEMVs (bench/bench_decode.py measures both). Needs a C++ compiler; the
        first step compiles (tens of seconds on 2 cores, seconds with inductor's disk cache warm). The prompt's
        prefill and steps that capture routing stay eager."""
        if self.lm_head.weight.device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise RuntimeError("compile_decoding needs a C++ compiler (g++, c++ or clang++ on PATH) for "
                               "torch.compile's CPU backend; without one, generate() runs eagerly")
        self._compiled_step = torch.compile(self.hidden_states, dynamic=True)

    def _decoding_head(self) -> torch.Tensor:
        """The lm_head as a contiguous [d, V] copy. For one token MKL's row-vector @ [d, V] is ~3x faster than
        @ [V, d]^T, and the head is a third of a decode step. The copy itself is slow (~40 ms for 49152 x 192), so
        it is kept until the weight changes (an optimizer step or a load bumps the tensor's version)."""
        w = self.lm_head.weight
        if w.is_inference():  # made under inference_mode: no version counter, so no safe reuse
            return w.t().contiguous()
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if self._head_key != key:
            self._head_t, self._head_key = w.detach().t().contiguous(), key
        return self._head_t

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator) -> int:
        if temperature == 0:
            return int(logits.argmax())
        logits = logits / temperature
        if 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    # -- Hugging Face format -------------------------------------------------------------------------------------
    def hf_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """State dict with transformers' on-disk keys: experts split into experts.{j}.{gate,up,down}_proj."""
        out = {}
        for key, tensor in self.state_dict().items():
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
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
        return out

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> None:
        """Write config.json, generation_config.json and model.safetensors in transformers' deepseek_v3 format."""
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
        save_file(self.hf_state_dict(dtype), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "SmolLM2DeepSeek":
        """Load a checkpoint written by save_pretrained or by transformers' DeepseekV3ForCausalLM."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in checkpoint directory {directory!r}")
        try:
            with open(config_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON (truncated or corrupt?): {err}") from None
        config = ModelConfig.from_hf_dict(hf, where=config_path)
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        state = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"missing weights file {path}")
            try:
                state.update(load_file(path))
            except (SafetensorError, OSError, ValueError) as err:
                raise ValueError(f"cannot read weights file {path} (truncated or corrupt?): {err}") from None
        with torch.device("meta"):
            model = cls(config)
        model.load_hf_state_dict(state, source=directory)
        model.rope_cos, model.rope_sin = rope_tables(config.qk_rope_head_dim, config.max_position_embeddings,
                                                     config.rope_theta)
        for moe in model.moe_layers:
            moe.gate.load = torch.zeros(config.n_routed_experts)
        model.to(device=device, dtype=dtype)
        for moe in model.moe_layers:  # the balancing bias stays fp32 whatever the weights' dtype
            moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.data.float()
        return model.eval()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load transformers-format tensors (per-expert keys or fused 3-D ones) into this model."""
        cfg = self.config
        state = dict(state)
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
        unexpected = sorted(k for k in state if k not in expected and not k.startswith(f"model.layers.{cfg.num_hidden_layers}."))
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not match the config; missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for key, tensor in expected.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
        self.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


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


if __name__ == "__main__":
    main()
