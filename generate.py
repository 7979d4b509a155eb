"""Generation for SmolLM2-DeepSeek: checked inputs, sampling, and the latent-cache decode loop (eager or compiled).

    from generate import Decoder, generate
    for tok in generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_k=50, return_routing=True):
        print(tok.token_id, tok.routing)           # routing: [(layer, [experts], [weights]), ...]
    decoder = Decoder(model, compile=True)         # one-token steps through torch.compile (needs a C++ compiler)
    for tok in decoder.stream(prompt_ids, max_new_tokens=64): ...

The prompt is prefilled in one pass with expanded attention (attn_impl "naive": per-head keys built once, then SDPA,
cheapest for many tokens); each new token then attends with `attn_impl` ("absorb" by default: over the cached
latents directly, never re-expanding the cache; "naive" re-expands it every step, as transformers does).
Every choice is an argument here; nothing in the model branches on global grad or compile state. Serving (the app's
engine: loading, admission, chat prompts) is serve.py, built on this.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from typing import Iterator

import torch

from model import LatentCache, SmolLM2DeepSeek

ATTN_IMPLS = ("naive", "absorb")
# Below this many new tokens the lm_head is used as it is; above, a contiguous [d, V] copy pays for itself: for one
# token a row vector @ [d, V] runs ~3x faster than @ [V, d]^T on the CPUs measured (1.7 vs 5.5 ms at d 192), while
# the copy costs ~40 ms. The copy lives for one call only, so it can never go stale after an optimizer step.
HEAD_COPY_MIN_TOKENS = 16


@dataclass
class GeneratedToken:
    """One streamed token. `routing` (when asked for): per MoE layer, (layer index, expert ids, weights)."""

    token_id: int
    routing: list[tuple[int, list[int], list[float]]] | None = None


def _whole_number(value, name: str) -> int:
    """An int (or a float with an integral value, as JSON clients send) -> int; anything else is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def check_prompt(prompt_ids, vocab_size: int) -> torch.Tensor:
    """A list of ints, a [T] or a [1, T] tensor -> a [1, T] long tensor; anything else is a ValueError by name."""
    try:
        ids = torch.as_tensor(prompt_ids)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError("prompt_ids must be a list of token ids or a [1, T] tensor") from None
    if ids.dim() == 2 and ids.shape[0] != 1:
        raise ValueError(f"generate continues one sequence: prompt_ids must be [T] or [1, T], got shape "
                         f"{list(ids.shape)} (call it once per sequence)")
    if ids.dim() not in (1, 2):
        raise ValueError(f"prompt_ids must be [T] or [1, T], got shape {list(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("generate needs a prompt of at least one token")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"prompt_ids must be integer token ids, got {ids.dtype}")
    ids = ids.to(torch.long).view(1, -1)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def check_sampling(max_new_tokens, temperature, top_k) -> tuple[int, float, int]:
    max_new_tokens = _whole_number(max_new_tokens, "max_new_tokens")
    top_k = _whole_number(top_k, "top_k")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0:
        raise ValueError(f"max_new_tokens, temperature and top_k must be >= 0, got {max_new_tokens}, "
                         f"{temperature}, {top_k}")
    return max_new_tokens, float(temperature), top_k


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, generator=None) -> int:
    """One token id from fp32 logits [V]: greedy at temperature 0, else softmax(logits / T) over the top-k."""
    if temperature == 0:
        return int(logits.argmax())
    # shift before dividing: a tiny temperature then sends every non-maximal logit to -inf, never inf - inf = NaN
    logits = (logits - logits.max()) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Decoder:
    """Streams tokens from a model. Holds what speeds decoding up for this model (the compiled step), so the model
    itself keeps no decoding state."""

    def __init__(self, model: SmolLM2DeepSeek, compile: bool = False, attn_impl: str = "absorb"):
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.model, self.attn_impl = model, attn_impl
        self.compiled_step = None
        if compile:
            self.compiled_step = self._compile()

    def _compile(self):
        """Each one-token step through torch.compile (inductor, dynamic shapes: one graph for every position and
        cache length). Eagerly a step is ~1500 small ATen calls (norms, rope, the absorbed attention, routing) whose
        per-call overhead outweighs their arithmetic at this size; inductor fuses them into a few loops around the
        GEMVs (bench/bench_decode.py measures both). The MoE layer gathers its K experts' weights by tensor index
        ("gather"), since a .tolist() would break the graph. The first step compiles (tens of seconds on 2 cores)."""
        if self.model.lm_head.weight.device.type == "cpu" and not any(
                shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise RuntimeError("compiled decoding needs a C++ compiler (g++, c++ or clang++ on PATH) for "
                               "torch.compile's CPU backend; without one, decode eagerly (compile=False)")
        hidden_states = self.model.hidden_states
        attn_impl = self.attn_impl

        def step(ids, cache, pos):
            return hidden_states(ids, cache, pos, attn_impl=attn_impl, expert_impl="gather")

        return torch.compile(step, dynamic=True)

    @torch.inference_mode()
    def stream(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               eos_token_id: int | tuple | None = -1, return_routing: bool = False,
               generator: torch.Generator | None = None) -> Iterator[GeneratedToken]:
        """Stream up to max_new_tokens tokens after prompt_ids (a list of ints, a [T] or [1, T] tensor).

        temperature 0 = greedy; top_k 0 (or >= vocab) = no top-k filter; stops after eos (not yielded; -1 = the
        config's eos, None = never, a tuple = any of these ids, e.g. a chat model's end of turn). Steps that capture routing run eagerly (the compiled step does not record it).
        """
        model, cfg = self.model, self.model.config
        ids = check_prompt(prompt_ids, cfg.vocab_size)
        max_new_tokens, temperature, top_k = check_sampling(max_new_tokens, temperature, top_k)
        if ids.shape[1] + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                             f"{cfg.max_position_embeddings} tokens")
        eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        stops = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        was_training = model.training
        model.eval()
        device = model.lm_head.weight.device
        ids = ids.to(device)
        cache = LatentCache(cfg, 1, ids.shape[1] + max_new_tokens, device, model.lm_head.weight.dtype)
        weight = model.lm_head.weight
        head = weight.detach().t().contiguous() if max_new_tokens >= HEAD_COPY_MIN_TOKENS else weight.t()
        first_moe = cfg.first_k_dense_replace
        try:
            pos, step_ids = 0, ids
            for _ in range(max_new_tokens):
                layers = [] if return_routing else None
                prefill = pos == 0
                if self.compiled_step is not None and not prefill and not return_routing:
                    h = self.compiled_step(step_ids, cache, pos)
                else:
                    h = model.hidden_states(step_ids, cache, pos, layers,
                                            attn_impl="naive" if prefill else self.attn_impl,
                                            expert_impl="sorted" if prefill else "direct")
                logits = (h[0, -1] @ head).float()  # [V]
                token = sample_token(logits, temperature, top_k, generator)
                if token in stops:
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
            model.train(was_training)


def generate(model: SmolLM2DeepSeek, prompt_ids, max_new_tokens: int = 64, **kwargs) -> Iterator[GeneratedToken]:
    """Stream tokens eagerly (see Decoder.stream for the arguments)."""
    return Decoder(model).stream(prompt_ids, max_new_tokens, **kwargs)
