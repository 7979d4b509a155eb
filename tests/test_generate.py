"""generate.py: greedy decoding equals the full forward's argmax on every path (naive/absorbed attention, eager/
compiled steps, after optimizer steps), sampling stays within top-k, and bad arguments are named."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, spread_model, tiny_config
from generate import BatchDecoder, DecodeHead, Decoder, generate
from model import LatentCache, SmolLM2DeepSeek
from config import TrainConfig
from train import build_optimizer


def greedy_matches_forward(model, prompt, tokens) -> bool:
    ids = list(prompt)
    for tok in tokens:
        with torch.no_grad():
            if tok != int(model(torch.tensor([ids]))[0, -1].argmax()):
                return False
        ids.append(tok)
    return True


def test_generate_greedy_matches_argmax_of_full_forward_and_reports_routing():
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config()).eval()
    prompt = [5, 17, 33, 2]
    out = list(generate(model, prompt, max_new_tokens=6, temperature=0, eos_token_id=None, return_routing=True))
    assert len(out) == 6
    assert greedy_matches_forward(model, prompt, [t.token_id for t in out])
    for tok in out:
        assert [layer for layer, _, _ in tok.routing] == [1, 2]
        for _, experts, weights in tok.routing:
            assert len(experts) == 2 and len(set(experts)) == 2 and all(0 <= e < 8 for e in experts)
            assert sum(weights) == pytest.approx(1.0, abs=1e-5)  # norm_topk_prob with scaling 1
    # the one decode loop: generate() is Decoder(model).stream()
    assert [t.token_id for t in Decoder(model).stream(prompt, 6, temperature=0, eos_token_id=None)] == \
        [t.token_id for t in out]


@pytest.mark.parametrize("vocab, parts", [(96, 1), (96, 4), (97, 4)])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_head_gives_the_lm_heads_logits(vocab, parts, rows):
    """The vocabulary cut into column blocks (one batched matmul) gives F.linear's logits, in fp32, in vocab order;
    a vocabulary the blocks do not divide falls back to one block."""
    torch.manual_seed(0)
    weight = torch.randn(vocab, 24)
    h = torch.randn(rows, 24)
    head = DecodeHead(weight, parts)
    assert head.blocks.shape[0] == (parts if vocab % parts == 0 else 1)
    logits = head(h)
    assert logits.shape == (rows, vocab) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.nn.functional.linear(h, weight), rtol=1e-6, atol=1e-6)
    assert torch.equal(logits.argmax(-1), (h @ weight.t()).argmax(-1))
    bf16 = DecodeHead(weight.bfloat16(), parts)(h.bfloat16())
    assert bf16.dtype == torch.float32  # bf16 weights: fp32 logits for sampling
    torch.testing.assert_close(bf16, torch.nn.functional.linear(h.bfloat16(), weight.bfloat16()).float())


def test_model_does_not_import_generate():
    """generate.py builds on model.py, never the other way round: no import circle."""
    code = "import sys, model; assert 'generate' not in sys.modules, 'model.py imported generate.py'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("new_tokens", [5, 20])  # below and above the length where the head is copied
def test_naive_and_absorbed_decoding_give_the_same_tokens(new_tokens):
    model = spread_model()
    prompt = [5, 17, 33, 2]
    naive = [t.token_id for t in Decoder(model, attn_impl="naive").stream(prompt, new_tokens, eos_token_id=None)]
    absorb = [t.token_id for t in Decoder(model, attn_impl="absorb").stream(prompt, new_tokens, eos_token_id=None)]
    assert naive == absorb
    assert greedy_matches_forward(model, prompt, absorb)
    with pytest.raises(ValueError, match="attn_impl"):
        Decoder(model, attn_impl="flash")


def test_generate_stops_on_eos_and_samples_within_top_k():
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config()).eval()
    first = next(generate(model, [1, 2, 3], max_new_tokens=1, temperature=0)).token_id
    assert list(generate(model, [1, 2, 3], max_new_tokens=5, temperature=0, eos_token_id=first)) == []
    with torch.no_grad():
        top3 = set(model(torch.tensor([[1, 2, 3]]))[0, -1].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    seen = {next(generate(model, [1, 2, 3], 1, temperature=5.0, top_k=3, eos_token_id=None, generator=g)).token_id
            for _ in range(30)}
    assert seen <= top3 and len(seen) > 1
    # a vanishing temperature is greedy, not a NaN from overflowing logits
    tiny_t = [t.token_id for t in generate(model, [1, 2, 3], 4, temperature=1e-45, eos_token_id=None)]
    assert tiny_t == [t.token_id for t in generate(model, [1, 2, 3], 4, temperature=0, eos_token_id=None)]


@pytest.mark.parametrize("prompt, kwargs, message", [
    ([1] * 60, dict(max_new_tokens=10), "exceeds the context"),
    ([[1, 2, 3], [4, 5, 6]], {}, r"one sequence.*\[2, 3\]"),
    ([1, TINY["vocab_size"]], {}, f"token id {TINY['vocab_size']} is outside the vocabulary"),
    ([1, -3], {}, "token id -3 is outside"),
    ([], {}, "at least one token"),
    ([1.5, 2.0], {}, "integer token ids"),
    ([1, 2], dict(temperature=float("inf")), "temperature must be a finite number"),
    ([1, 2], dict(temperature=float("nan")), "temperature must be a finite number"),
    ([1, 2], dict(top_k=float("nan")), "top_k must be a whole number"),
    ([1, 2], dict(top_k=2.5), "top_k must be a whole number"),
    ([1, 2], dict(max_new_tokens=3.5), "max_new_tokens must be a whole number"),
    ([1, 2], dict(max_new_tokens=-1), ">= 0"),
])
def test_bad_arguments_are_named(prompt, kwargs, message):
    model = SmolLM2DeepSeek(tiny_config()).eval()
    with pytest.raises(ValueError, match=message):
        list(generate(model, prompt, **kwargs))


def test_whole_floats_are_accepted():
    model = SmolLM2DeepSeek(tiny_config()).eval()
    assert len(list(generate(model, torch.tensor([1, 2]), max_new_tokens=3.0, top_k=5.0, eos_token_id=None))) == 3


def test_generate_after_fused_adamw_steps_uses_the_new_weights():
    """Fused AdamW updates the weights without bumping their version counter: a decoding copy of the lm_head kept
    across calls went stale and generate() disagreed with forward(). Nothing is kept across calls now."""
    model = spread_model().train()
    opt = build_optimizer(model, TrainConfig(lr=0.05, warmup_steps=0), torch.device("cpu"))
    prompt = [5, 17, 33, 2]
    before = [t.token_id for t in generate(model, prompt, 20, eos_token_id=None)]
    ids = torch.randint(0, TINY["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = [t.token_id for t in generate(model, prompt, 20, eos_token_id=None)]
    assert after != before  # the steps changed what the model says...
    assert greedy_matches_forward(model.eval(), prompt, after)  # ...and generate says what forward says


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_decoding_matches_eager_decoding():
    model = spread_model()
    prompts = [[5, 17, 33, 2], list(range(1, 30))]  # two cache lengths: one dynamic-shape graph serves both
    eager = [[t.token_id for t in generate(model, p, 8, temperature=0, eos_token_id=None)] for p in prompts]
    decoder = Decoder(model, compile=True)
    compiled = [[t.token_id for t in decoder.stream(p, 8, temperature=0, eos_token_id=None)] for p in prompts]
    assert compiled == eager
    # the compiled step returns the routing too: a stream that records it (the app's) stays on the compiled path
    routed = list(decoder.stream(prompts[1], 8, temperature=0, eos_token_id=None, return_routing=True))
    expected = list(generate(model, prompts[1], 8, temperature=0, eos_token_id=None, return_routing=True))
    assert [t.token_id for t in routed] == eager[1]
    for got, want in zip(routed, expected):
        assert [(layer, sorted(e)) for layer, e, _ in got.routing] == [(layer, sorted(e)) for layer, e, _ in
                                                                      want.routing]
        for (_, _, w_got), (_, _, w_want) in zip(got.routing, want.routing):
            assert sorted(w_got) == pytest.approx(sorted(w_want), abs=1e-5)
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():  # the compiled one-token step itself (MoE layers on the gathered-weights path)
        caches = [LatentCache(model.config, 1, 12, "cpu", torch.float32) for _ in range(2)]
        for cache in caches:
            model.hidden_states(ids[:, :11], cache, 0)
        step_eager = model.hidden_states(ids[:, 11:], caches[0], 11, attn_impl="absorb", expert_impl="direct")
        step_compiled, routing = decoder.compiled_step(ids[:, 11:], caches[1], 11)
    assert (step_compiled - step_eager).abs().max().item() <= 1e-5
    assert len(routing) == model.config.num_moe_layers and routing[0][0].shape == (1, 1, TINY["num_experts_per_tok"])


def solo_run(model, prompt, n, temperature=0.0, top_k=0, seed=None, eos=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return [(t.token_id, t.routing) for t in generate(model, prompt, n, temperature=temperature, top_k=top_k,
                                                      eos_token_id=eos, return_routing=True, generator=g)]


def assert_same_run(got, want, name):
    assert [t for t, _ in got] == [t for t, _ in want], name
    for (_, r1), (_, r2) in zip(got, want):  # the routing that produced each token: same experts, same weights
        assert [(layer, experts) for layer, experts, _ in r1] == [(layer, experts) for layer, experts, _ in r2], name
        for (_, _, w1), (_, _, w2) in zip(r1, r2):
            assert w1 == pytest.approx(w2, abs=1e-5), name


HYBRID = dict(layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_heads=3,
              linear_head_dim=8)  # issue 22: KDA layers whose states must follow their rows too


@pytest.mark.parametrize("attn_impl, overrides", [("absorb", {}), ("naive", {}), ("absorb", HYBRID)])
def test_batched_streams_give_their_solo_tokens_and_routing_as_they_join_and_leave(attn_impl, overrides):
    """Continuous batching: six streams (greedy and seeded-sampled, prompts of 2..11 tokens) join a 3-row batch at
    different steps, a waiting one taking the row another gives back; they leave by budget, at a stop id and by
    cancellation. Each stream's tokens and routing equal its solo run's (also for a KDA + MLA hybrid)."""
    model = spread_model(**overrides)
    prompts = [[5, 17, 33, 2], [9, 1], list(range(3, 14)), [40, 41, 42, 43, 44, 45, 46], [7, 7, 7], [60, 2, 8, 90, 3]]
    specs = [  # (join at step, prompt, max new, temperature, top_k, seed)
        (0, prompts[0], 9, 0.0, 0, None),
        (0, prompts[1], 4, 1.3, 5, 11),
        (2, prompts[2], 12, 0.0, 0, None),  # joins a running batch
        (3, prompts[3], 8, 0.9, 0, 12),  # waits: the batch is full until stream 1 leaves
        (5, prompts[4], 10, 0.0, 0, None),  # stopped at a stop id (below)
        (6, prompts[5], 10, 1.0, 20, 13),  # cancelled after 3 tokens
    ]
    want = [solo_run(model, p, n, t, k, seed) for _, p, n, t, k, seed in specs]
    free = [tok for tok, _ in want[4]]
    stop_at = next(j for j in range(2, len(free)) if free[j] not in free[:j])  # a token first seen at j >= 2
    stops = {4: free[stop_at]}
    want[4] = solo_run(model, prompts[4], 10, eos=stops[4])
    assert len(want[4]) == stop_at
    cancel_after = {5: 3}
    want[5] = want[5][:3]

    batch = BatchDecoder(model, max_batch=3, attn_impl=attn_impl)
    got = {i: [] for i in range(len(specs))}
    waiting, running, step = list(range(len(specs))), {}, 0
    while waiting or batch.streams:
        for i in [i for i in waiting if specs[i][0] <= step]:
            if len(batch.streams) == batch.max_batch:
                break  # first come, first served: the rest wait for a free row
            _, prompt, n, temperature, top_k, seed = specs[i]
            g = None if seed is None else torch.Generator().manual_seed(seed)
            stream, first = batch.join(prompt, n, temperature, top_k, eos_token_id=stops.get(i), return_routing=True,
                                       generator=g, owner=i)
            waiting.remove(i)
            if first is not None:
                got[i].append((first.token_id, first.routing))
        for stream, token in batch.step():
            if token is not None:
                got[stream.owner].append((token.token_id, token.routing))
        for stream in list(batch.streams):
            if stream.owner in cancel_after and len(got[stream.owner]) >= cancel_after[stream.owner]:
                batch.leave(stream)  # cancelled: its row goes back
        assert len(batch.streams) <= 3
        step += 1
    for i in range(len(specs)):
        assert_same_run(got[i], want[i], f"stream {i}")
    assert batch.cache.kv.shape[1] == 3  # never more rows than the batch bound


def test_batch_join_refuses_bad_input_without_disturbing_the_batch():
    model = spread_model()
    batch = BatchDecoder(model, max_batch=2)
    _, first = batch.join([5, 17, 33, 2], 6, owner="good")
    for bad in [dict(prompt_ids=[1, TINY["vocab_size"]]), dict(prompt_ids=[]), dict(temperature=float("nan")),
                dict(eos_token_id="x"), dict(max_new_tokens=-2), dict(prompt_ids=[1] * 60, max_new_tokens=10)]:
        with pytest.raises(ValueError):
            batch.join(**{"prompt_ids": [1, 2], "max_new_tokens": 3, **bad})
    assert [s.owner for s in batch.streams] == ["good"]
    stream, _ = batch.join([1, 2], 0)
    assert stream.done and len(batch.streams) == 1  # nothing to generate: no row taken
    batch.join([3, 4], 2, owner="other")
    with pytest.raises(RuntimeError, match="full"):
        batch.join([1, 2], 3)
    tokens = [first.token_id]
    while batch.streams:
        tokens += [t.token_id for s, t in batch.step() if s.owner == "good" and t is not None]
    assert tokens == [t.token_id for t in generate(model, [5, 17, 33, 2], 6)]
