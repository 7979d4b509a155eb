"""Greedy decoding: ours (latent cache, absorbed MLA) vs transformers' generate with its cache, after a 64-token and a
1024-token prompt; and the KV-cache bytes per token per layer vs SmolLM2-135M's GQA.

    python bench/bench_decode.py [--new 32] [--prompts 64 1024]
"""
import argparse
import tempfile

import torch

from common import REFERENCE, ModelConfig, best_time, ours, transformers_twin


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=32, help="tokens generated per run")
    p.add_argument("--prompts", type=int, nargs="+", default=[64, 1024])
    args = p.parse_args()
    model = ours().eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf = transformers_twin(model, tmp).eval()
    for n_prompt in args.prompts:
        prompt = torch.randint(1, REFERENCE["vocab_size"], (1, n_prompt), generator=torch.Generator().manual_seed(0))

        def run_ours():
            return [t.token_id for t in model.generate(prompt[0].tolist(), args.new, temperature=0, eos_token_id=None)]

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                  use_cache=True, pad_token_id=0)
            return out[0, n_prompt:].tolist()

        def run_prefill_ours():  # prefill alone, to separate decode speed from prompt processing
            return next(model.generate(prompt[0].tolist(), 1, temperature=0, eos_token_id=None))

        def run_prefill_hf():
            with torch.inference_mode():
                return hf.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)

        same = run_ours() == run_hf()
        t_ours, t_hf = best_time(run_ours, repeats=4), best_time(run_hf, repeats=4)
        p_ours, p_hf = best_time(run_prefill_ours, repeats=2), best_time(run_prefill_hf, repeats=2)
        d_ours = (args.new - 1) / max(t_ours - p_ours, 1e-9)
        d_hf = (args.new - 1) / max(t_hf - p_hf, 1e-9)
        print(f"prompt {n_prompt}: end-to-end {args.new / t_ours:.1f} vs {args.new / t_hf:.1f} tok/s "
              f"(ratio {t_hf / t_ours:.2f}x); decode only {d_ours:.1f} vs {d_hf:.1f} tok/s (ratio {d_ours / d_hf:.2f}x)"
              f"; same greedy tokens: {same}")
    cfg = model.config
    ours_values = cfg.kv_cache_values_per_token
    print(f"KV cache per token per layer: ours {ours_values} values ({ours_values * 4} B fp32) for this config; "
          f"transformers' cache stores the same latents here (it re-expands them every step)")
    full = ModelConfig.from_yaml("config_smollm2_135.yaml")
    print(f"full model: {full.kv_cache_values_per_token} values vs SmolLM2-135M GQA 384 "
          f"-> ratio {full.kv_cache_values_per_token / 384:.3f} (goal <= 0.40)")


if __name__ == "__main__":
    main()
