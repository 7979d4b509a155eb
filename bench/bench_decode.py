"""Greedy decoding: ours (latent cache, absorbed MLA; eager, then compiled: generate.Decoder(model, compile=True))
vs transformers' generate
with its cache, after a 64-token and a 1024-token prompt; and the KV-cache bytes per token per layer vs
SmolLM2-135M's GQA.

    python bench/bench_decode.py [--new 32] [--prompts 64 1024] [--no-compile]
"""
import argparse
import tempfile
import time

import torch

from common import REFERENCE, ModelConfig, best_time, ours, transformers_twin
from generate import Decoder


def decode_rate(generate_tokens, n_new: int) -> tuple[float, float]:
    """(end-to-end, decode-only) tokens/s; decode-only takes the prefill (a 1-token run) out of the time."""
    total = best_time(lambda: generate_tokens(n_new), repeats=4)
    prefill = best_time(lambda: generate_tokens(1), repeats=2)
    return n_new / total, (n_new - 1) / max(total - prefill, 1e-9)


def measure_ours(ours_run, hf_run, n_new: int) -> tuple[float, float, bool]:
    """decode_rate of ours, and whether its greedy tokens equal transformers'."""
    return *decode_rate(ours_run, n_new), ours_run(n_new) == hf_run(n_new)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=32, help="tokens generated per run")
    p.add_argument("--prompts", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--no-compile", action="store_true", help="skip the compiled-decoding measurement")
    args = p.parse_args()
    model = ours().eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf = transformers_twin(model, tmp).eval()
    prompts = {n: torch.randint(1, REFERENCE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
               for n in args.prompts}

    decoder = Decoder(model)

    def ours_tokens(n_prompt):
        return lambda n: [t.token_id for t in decoder.stream(prompts[n_prompt][0].tolist(), n, temperature=0,
                                                             eos_token_id=None)]

    def hf_tokens(n_prompt):
        def run(n):
            with torch.inference_mode():
                out = hf.generate(prompts[n_prompt], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  use_cache=True, pad_token_id=0)
            return out[0, n_prompt:].tolist()
        return run

    rates = {n: {"transformers": decode_rate(hf_tokens(n), args.new),
                 "ours eager": measure_ours(ours_tokens(n), hf_tokens(n), args.new)} for n in args.prompts}
    if not args.no_compile:
        decoder = Decoder(model, compile=True)
        start = time.perf_counter()
        ours_tokens(args.prompts[0])(3)  # the first one-token step compiles
        print(f"compiled decoding: first compiled step after {time.perf_counter() - start:.1f} s")
        for n in args.prompts:
            rates[n]["ours compiled"] = measure_ours(ours_tokens(n), hf_tokens(n), args.new)
    for n_prompt, r in rates.items():
        hf_total, hf_decode = r["transformers"]
        print(f"prompt {n_prompt}: transformers {hf_decode:.1f} tok/s decode only ({hf_total:.1f} end-to-end)")
        for name in ["ours eager", "ours compiled"]:
            if name in r:
                total, decode, same = r[name]
                print(f"  {name:13s} {decode:6.1f} tok/s decode only, ratio {decode / hf_decode:.2f}x (goal >= 3x); "
                      f"end-to-end {total:.1f} tok/s, {total / hf_total:.2f}x; same greedy tokens: {same}")
    cfg = model.config
    ours_values = cfg.kv_cache_values_per_token
    print(f"KV cache per token per layer: ours {ours_values} values ({ours_values * 4} B fp32) for this config; "
          f"transformers' cache stores the same latents here (it re-expands them every step)")
    full = ModelConfig.from_yaml("config_smollm2_135.yaml")
    print(f"full model: {full.kv_cache_values_per_token} values vs SmolLM2-135M GQA 384 "
          f"-> ratio {full.kv_cache_values_per_token / 384:.3f} (goal <= 0.40)")


if __name__ == "__main__":
    main()
