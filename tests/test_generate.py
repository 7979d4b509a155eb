"""generate.py: greedy decoding equals the full forward's argmax on every path (naive/absorbed attention, eager/
compiled steps, after optimizer steps), sampling stays within top-k, and bad arguments are named."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, spread_model, tiny_config
from generate import Decoder, generate
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
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():  # the compiled one-token step itself (MoE layers on the gathered-weights path)
        caches = [LatentCache(model.config, 1, 12, "cpu", torch.float32) for _ in range(2)]
        for cache in caches:
            model.hidden_states(ids[:, :11], cache, 0)
        step_eager = model.hidden_states(ids[:, 11:], caches[0], 11, attn_impl="absorb", expert_impl="direct")
        step_compiled = decoder.compiled_step(ids[:, 11:], caches[1], 11)
    assert (step_compiled - step_eager).abs().max().item() <= 1e-5
