"""Generation for SmolLM2-DeepSeek: checked inputs, sampling, and the latent-cache decode loop (eager or compiled).

    from generate import BatchDecoder, Decoder, generate
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


class DecodeHead:
    """The lm_head laid out for decode steps: logits [B, V] for B hidden states, the one matmul of a step that reads a
    large weight (V x d). Measured on 2-core EPYCs at V 49152 (x @ W^T, as F.linear does, runs ~3.5x slower than
    x @ [d, V], and MKL computes a few rows @ [d, V] on one core): the vocabulary is cut into `parts` column blocks
    [parts, d, V / parts] and one batched matmul computes them side by side, on every core. At d 192 one row takes
    0.68 ms vs 1.3 (x @ [d, V]) and 4.6-4.8 (F.linear); four rows 2.8 ms vs 6.5; at d 576 one row 3.0 vs 4.4-5.0,
    four rows 8.5-8.9 vs 19. Each logit is the same dot product either way (tests/test_generate.py holds them to
    F.linear's).

    It is a copy (~40 ms to make at d 192): a decoder makes one and keeps it for its life, so a model whose weights
    change (training) needs a new decoder afterwards (generate() makes one per call). Blocks: twice the intra-op
    threads (4 and 2 measured alike on 2 cores)."""

    def __init__(self, weight: torch.Tensor, parts: int | None = None):
        V, d = weight.shape
        parts = parts or 2 * torch.get_num_threads()
        if V % parts:
            parts = 1
        with torch.no_grad():  # [V, d] -> [d, V] -> [parts, d, V / parts], one contiguous copy
            self.blocks = weight.detach().t().reshape(d, parts, V // parts).permute(1, 0, 2).contiguous()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, d] -> fp32 logits [B, V]."""
        parts, d, block = self.blocks.shape
        B = h.shape[0]
        out = torch.bmm(h.to(self.blocks.dtype).expand(parts, B, d), self.blocks)  # [parts, B, V / parts]
        return out.permute(1, 0, 2).reshape(B, parts * block).float()


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


def check_stream(cfg, prompt_ids, max_new_tokens, temperature, top_k, eos_token_id) -> tuple:
    """One stream's checked arguments: (ids [1, T], max_new_tokens, temperature, top_k, stop ids tuple). eos_token_id
    -1 = the config's eos, None = never stop, an int or a tuple of ids = stop at any of them."""
    ids = check_prompt(prompt_ids, cfg.vocab_size)
    max_new_tokens, temperature, top_k = check_sampling(max_new_tokens, temperature, top_k)
    if ids.shape[1] + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                         f"{cfg.max_position_embeddings} tokens")
    eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
    stops = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in stops):
        raise ValueError(f"eos_token_id must be None, a token id or a tuple of ids, got {eos_token_id!r}")
    return ids, max_new_tokens, temperature, top_k, stops


def row_routing(layers: list, row: int, first_moe: int) -> list[tuple[int, list[int], list[float]]]:
    """The routing that produced a row's next token: the last input position of every MoE layer of one forward
    (`layers`: its (experts [B, T, K], weights [B, T, K]) per MoE layer)."""
    return [(first_moe + i, experts[row, -1].tolist(), weights[row, -1].tolist())
            for i, (experts, weights) in enumerate(layers)]


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


def compile_step(model: SmolLM2DeepSeek, attn_impl: str = "absorb"):
    """One-token decode steps through torch.compile: step(ids [B, 1], cache, pos int) -> (hidden [B, 1, d], routing:
    per MoE layer (experts [B, 1, K], weights [B, 1, K])). Inductor with dynamic shapes: one graph for every position
    and cache length. Eagerly a step is ~1500 small ATen calls (norms, rope, the absorbed attention, routing) whose
    per-call overhead outweighs their arithmetic at this size; inductor fuses them into a few loops around the GEMVs
    (bench/bench_decode.py measures both). The MoE layers gather their K experts' weights by tensor index ("gather":
    one row at a time), since a .tolist() would break the graph. The first call compiles (tens of seconds on 2
    cores); the routing comes back as outputs, so recording it costs the compiled step nothing."""
    if model.lm_head.weight.device.type == "cpu" and not has_cxx_compiler():
        raise RuntimeError("compiled decoding needs a C++ compiler (g++, c++ or clang++ on PATH) for "
                           "torch.compile's CPU backend; without one, decode eagerly (compile=False)")
    hidden_states = model.hidden_states

    def step(ids, cache, pos):
        layers = []
        h = hidden_states(ids, cache, pos, layers, attn_impl=attn_impl, expert_impl="gather")
        return h, layers

    compiled = torch.compile(step, dynamic=True)

    def run(ids, cache, pos):
        # the cache's length is an attribute's size, which dynamic=True alone would specialise on (a recompile for
        # every new cache length); the row view of a many-row cache still gets its own graph (its strides differ)
        torch._dynamo.mark_dynamic(cache.kv, 2)
        return compiled(ids, cache, pos)

    return run


def has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


class Decoder:
    """Streams tokens from a model. Holds what speeds decoding up for this model (the laid-out lm_head, the compiled
    step), so the model itself keeps no decoding state; make a new Decoder after its weights change."""

    def __init__(self, model: SmolLM2DeepSeek, compile: bool = False, attn_impl: str = "absorb",
                 head: DecodeHead | None = None):
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.model, self.attn_impl = model, attn_impl
        # a copy (a new Decoder after the weights change), or `head`: one its caller keeps for fixed weights
        self.head = head if head is not None else DecodeHead(model.lm_head.weight)
        self.compiled_step = compile_step(model, attn_impl) if compile else None

    @torch.inference_mode()
    def stream(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               eos_token_id: int | tuple | None = -1, return_routing: bool = False,
               generator: torch.Generator | None = None) -> Iterator[GeneratedToken]:
        """Stream up to max_new_tokens tokens after prompt_ids (a list of ints, a [T] or [1, T] tensor).

        temperature 0 = greedy; top_k 0 (or >= vocab) = no top-k filter; stops after eos (not yielded; -1 = the
        config's eos, None = never, a tuple = any of these ids, e.g. a chat model's end of turn).
        """
        model, cfg = self.model, self.model.config
        ids, max_new_tokens, temperature, top_k, stops = check_stream(cfg, prompt_ids, max_new_tokens, temperature,
                                                                      top_k, eos_token_id)
        was_training = model.training
        model.eval()
        device = model.lm_head.weight.device
        ids = ids.to(device)
        cache = LatentCache(cfg, 1, ids.shape[1] + max_new_tokens, device, model.lm_head.weight.dtype)
        head = self.head
        first_moe = cfg.first_k_dense_replace
        try:
            pos, step_ids = 0, ids
            for _ in range(max_new_tokens):
                layers = [] if return_routing else None
                prefill = pos == 0
                if self.compiled_step is not None and not prefill:
                    h, layers = self.compiled_step(step_ids, cache, pos)
                else:
                    h = model.hidden_states(step_ids, cache, pos, layers,
                                            attn_impl="naive" if prefill else self.attn_impl,
                                            expert_impl="sorted" if prefill else "direct")
                logits = head(h[:, -1])[0]  # [V]
                token = sample_token(logits, temperature, top_k, generator)
                if token in stops:
                    return
                yield GeneratedToken(token, row_routing(layers, 0, first_moe) if return_routing else None)
                pos += step_ids.shape[1]
                step_ids = torch.tensor([[token]], device=device)
        finally:
            model.train(was_training)


class BatchStream:
    """One stream's place in a BatchDecoder: its settings, how many tokens its cache row holds, the token it feeds
    next, and the tokens it may still produce. `owner` is the caller's (serve.Batcher keeps its request there)."""

    def __init__(self, ids, max_new_tokens, temperature, top_k, stops, return_routing, generator, owner):
        self.prompt_len = ids.shape[1]
        self.left, self.temperature, self.top_k, self.stops = max_new_tokens, temperature, top_k, stops
        self.return_routing, self.generator, self.owner = return_routing, generator, owner
        self.length = 0  # tokens written to its cache row
        self.token = None  # the last sampled token: the input of its next step
        self.done = max_new_tokens == 0


class BatchDecoder:
    """Continuous batching: many streams decoded together, one forward per step for all of them.

    Each stream owns one row of a shared LatentCache, right-padded: its tokens sit at slots 0..length-1 (slot =
    position) and the model's per-row start_pos masks the slots past each row's end. `join` prefills a new stream
    alone, straight into its row (exactly its solo prefill), and samples its first token; `step` feeds every row's
    last token in one forward ([B, 1] ids, per-row positions) and samples each row with its own settings and
    generator; a stream that is done (budget, stop id) or `leave`s gives its row back: the last row moves into the
    gap, so the batch never computes empty rows. The cache grows as streams need rows or length.

        batch = BatchDecoder(model, max_batch=16)
        stream, first = batch.join(prompt_ids, max_new_tokens=64, temperature=0.8, top_k=50, generator=g)
        while batch.streams:
            for stream, token in batch.step(): ...   # token None: the stream stopped at a stop id
    """

    def __init__(self, model: SmolLM2DeepSeek, max_batch: int = 16, attn_impl: str = "absorb", compiled_step=None,
                 head: DecodeHead | None = None):
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if model.training:
            raise ValueError("BatchDecoder decodes a model in eval mode (call model.eval())")
        self.model, self.max_batch, self.attn_impl = model, max_batch, attn_impl
        # compile_step(model)'s step, if given: a step with one stream (the common case on a quiet Space) runs
        # through it; several streams run eagerly (the compiled step gathers one row's experts)
        self.compiled_step = compiled_step
        self.compiled_steps = 0  # steps that ran through it (tests, the bench)
        self.streams: list[BatchStream] = []  # row i of the cache is streams[i]
        self.cache: LatentCache | None = None
        # the laid-out lm_head: made for this decoder's life, or `head`, one its caller keeps for a model whose
        # weights do not change (serve.Batcher: one per served model)
        self.head = head if head is not None else DecodeHead(model.lm_head.weight)
        self.first_moe = model.config.first_k_dense_replace

    def _reserve(self, rows: int, length: int) -> None:
        """A cache with at least `rows` rows of `length` slots, keeping what the current one holds."""
        old = self.cache
        if old is not None and old.kv.shape[1] >= rows and old.max_len >= length:
            return
        cfg, weight = self.model.config, self.model.lm_head.weight
        old_rows, old_len = (old.kv.shape[1], old.max_len) if old is not None else (0, 0)
        new_rows = min(self.max_batch, max(rows, 2 * old_rows))
        new_len = max(length, min(cfg.max_position_embeddings, -(-max(length, old_len) // 64) * 64))
        self.cache = LatentCache(cfg, new_rows, new_len, weight.device, weight.dtype)
        if old is not None:
            self.cache.kv[:, :old_rows, :old_len] = old.kv
            self.cache.conv[:, :old_rows] = old.conv  # a hybrid's KDA states (empty for an all-MLA model)
            self.cache.state[:, :old_rows] = old.state

    def _sample(self, stream: BatchStream, logits: torch.Tensor, layers, row: int) -> GeneratedToken | None:
        token = sample_token(logits, stream.temperature, stream.top_k, stream.generator)
        if token in stream.stops:
            stream.done = True
            return None
        stream.token, stream.left = token, stream.left - 1
        stream.done = stream.left == 0
        return GeneratedToken(token, row_routing(layers, row, self.first_moe) if stream.return_routing else None)

    @torch.inference_mode()
    def join(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             eos_token_id: int | tuple | None = -1, return_routing: bool = False,
             generator: torch.Generator | None = None, owner=None) -> tuple[BatchStream, GeneratedToken | None]:
        """Add a stream (arguments as Decoder.stream): its prompt is prefilled into a free row and its first token
        sampled. Returns the stream and that token (None: it stopped at once). A stream that is already done (no
        budget left, a stop id) takes no row. Bad arguments raise ValueError and change nothing."""
        cfg = self.model.config
        ids, max_new_tokens, temperature, top_k, stops = check_stream(cfg, prompt_ids, max_new_tokens, temperature,
                                                                      top_k, eos_token_id)
        stream = BatchStream(ids, max_new_tokens, temperature, top_k, stops, return_routing, generator, owner)
        if stream.done:
            return stream, None
        if len(self.streams) >= self.max_batch:
            raise RuntimeError(f"the batch is full ({self.max_batch} streams)")
        row = len(self.streams)
        self._reserve(row + 1, ids.shape[1] + max_new_tokens)
        layers = [] if return_routing else None
        ids = ids.to(self.model.lm_head.weight.device)
        h = self.model.hidden_states(ids, self.cache.rows(row, row + 1), 0, layers, attn_impl="naive",
                                     expert_impl="sorted")
        stream.length = ids.shape[1]
        first = self._sample(stream, self.head(h[:, -1])[0], layers, 0)
        if not stream.done:
            self.streams.append(stream)
        return stream, first

    @torch.inference_mode()
    def step(self) -> list[tuple[BatchStream, GeneratedToken | None]]:
        """One token for every stream, in one forward. Returns (stream, its token) per stream (token None: it stopped
        at a stop id); streams that are done leave the batch."""
        if not self.streams:
            return []
        device = self.model.lm_head.weight.device
        B = len(self.streams)
        ids = torch.tensor([[s.token] for s in self.streams], device=device)
        layers = [] if any(s.return_routing for s in self.streams) else None
        if B == 1 and self.compiled_step is not None:
            h, layers = self.compiled_step(ids, self.cache.rows(0, 1), self.streams[0].length)
            self.compiled_steps += 1
        elif B == 1:  # a stream alone steps as Decoder.stream does: one position, its K experts called directly
            h = self.model.hidden_states(ids, self.cache.rows(0, 1), self.streams[0].length, layers,
                                         attn_impl=self.attn_impl, expert_impl="direct")
        else:  # per-row positions
            pos = torch.tensor([s.length for s in self.streams], device=device)
            h = self.model.hidden_states(ids, self.cache.rows(0, B), pos, layers, attn_impl=self.attn_impl,
                                         expert_impl="sorted")
        logits = self.head(h[:, -1])  # [B, V]
        out = []
        for row, stream in enumerate(self.streams):
            stream.length += 1
            out.append((stream, self._sample(stream, logits[row], layers, row)))
        for stream, _ in out:
            if stream.done:
                self.leave(stream)
        return out

    def leave(self, stream: BatchStream) -> None:
        """Take a stream out of the batch (finished or cancelled): the last row moves into its row."""
        if stream not in self.streams:
            return
        row, last = self.streams.index(stream), len(self.streams) - 1
        if row != last:
            moved = self.streams[last]
            with torch.inference_mode():
                self.cache.move_row(last, row, moved.length)
            self.streams[row] = moved
        self.streams.pop()


def generate(model: SmolLM2DeepSeek, prompt_ids, max_new_tokens: int = 64, **kwargs) -> Iterator[GeneratedToken]:
    """Stream tokens eagerly (see Decoder.stream for the arguments)."""
    return Decoder(model).stream(prompt_ids, max_new_tokens, **kwargs)
