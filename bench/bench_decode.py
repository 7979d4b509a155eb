"""Greedy decoding, ours (latent cache, absorbed MLA; eager, and compiled unless --no-compile) against transformers'
`generate` with its cache, after each prompt length; and the KV-cache bytes per token per layer vs SmolLM2-135M's GQA.

    python3 bench/bench_decode.py [--rounds 5] [--new 32] [--prompts 64 1024] [--no-compile]
    python3 bench/bench_decode.py --model-dir checkpoints/final --prompts 64     # the shipped model, single stream

Made to be trusted on a shared 2-core machine: the sides are interleaved (each round times every side once per
prompt, in an order that rotates between rounds), so a burst of other work hits all of them alike; each side's
fastest and median round are reported with both ratios, the load average before and after every round, and whether
ours gave transformers' greedy tokens in every round. A round's rate is decode only: (new - 1) tokens over the time
of a `new`-token run minus the time of a 1-token run (prefill + first token). Writes results/decode.json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from common import REFERENCE, ModelConfig, cpu_model, ours, transformers_twin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from generate import Decoder  # noqa: E402
from model import SmolLM2DeepSeek  # noqa: E402

# A config small enough for a smoke run (tests/test_bench.py): same architecture, tiny sizes
TINY = dict(REFERENCE, vocab_size=512, hidden_size=32, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16, intermediate_size=64, num_hidden_layers=2,
            max_position_embeddings=256)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new", type=int, default=32, help="tokens generated per timed run")
    p.add_argument("--prompts", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip compiled decoding")
    p.add_argument("--model-dir", help="a checkpoint (e.g. checkpoints/final) instead of the random reference model")
    p.add_argument("--tiny", action="store_true", help="a tiny random config (smoke runs only: no real timing)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "decode.json"))
    args = p.parse_args(argv)
    if args.new < 2:
        p.error("--new must be at least 2 (the decode-only rate takes a 1-token run away)")

    if args.model_dir:
        model = SmolLM2DeepSeek.from_pretrained(args.model_dir)
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
        what = args.model_dir
    else:
        model = ours(TINY if args.tiny else REFERENCE).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf = transformers_twin(model, tmp).eval()
        what = "tiny random config" if args.tiny else "bench/common.py REFERENCE (random weights)"
    vocab = model.config.vocab_size
    prompts = {n: torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(n)) for n in args.prompts}

    def ours_side(decoder):
        def run(n_prompt, n):
            return [t.token_id for t in decoder.stream(prompts[n_prompt][0].tolist(), n, temperature=0,
                                                       eos_token_id=None)]
        return run

    def hf_run(n_prompt, n):
        with torch.inference_mode():
            out = hf.generate(prompts[n_prompt], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              use_cache=True, pad_token_id=0)
        return out[0, n_prompt:].tolist()

    sides = {"transformers": hf_run, "ours eager": ours_side(Decoder(model))}
    compile_s = None
    if not args.no_compile:
        compiled = Decoder(model, compile=True)
        start = time.perf_counter()
        ours_side(compiled)(args.prompts[0], 3)  # the first one-token step compiles
        compile_s = time.perf_counter() - start
        print(f"compiled decoding: first compiled step after {compile_s:.1f} s", flush=True)
        sides["ours compiled"] = ours_side(compiled)
    names = list(sides)
    for n in args.prompts:  # warm-up: first calls, allocations
        for name in names:
            sides[name](n, 2)

    def fastest_and_median(values):
        values = [v for v in values if v is not None]
        return (max(values), statistics.median(values)) if values else (None, None)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    def show(value, unit=""):
        return "n/a" if value is None else f"{value:.2f}{unit}"

    rates = {n: {name: [] for name in names} for n in args.prompts}
    same = {n: {name: True for name in names if name != "transformers"} for n in args.prompts}
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        load_before = os.getloadavg()
        for n in args.prompts:
            tokens = {}
            for name in order:
                run = sides[name]
                first = timed(lambda: run(n, 1))
                out = []
                total = timed(lambda: out.extend(run(n, args.new)))
                # a 1-token run slower than the whole run: noise from other work, no rate for this round
                rates[n][name].append((args.new - 1) / (total - first) if total > first else None)
                tokens[name] = out
            for name in same[n]:
                same[n][name] &= tokens[name] == tokens["transformers"]
        rounds.append({"round": r, "order": order, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                       "tok_s": {n: {name: rates[n][name][-1] for name in names} for n in args.prompts}})
        print(f"round {r + 1}/{args.rounds} (load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}): " + "; ".join(
            f"prompt {n}: " + ", ".join(f"{name} {show(rates[n][name][-1])}" for name in names)
            for n in args.prompts), flush=True)

    summary = {}
    for n in args.prompts:
        hf_fast, hf_med = fastest_and_median(rates[n]["transformers"])
        row = {"transformers": {"fastest_tok_s": hf_fast, "median_tok_s": hf_med}}
        print(f"prompt {n}: transformers {show(hf_fast)} / {show(hf_med)} tok/s decode only (fastest / median round)")
        for name in names[1:]:
            fast, med = fastest_and_median(rates[n][name])
            row[name] = {"fastest_tok_s": fast, "median_tok_s": med, "ratio_fastest": ratio(fast, hf_fast),
                         "ratio_median": ratio(med, hf_med), "same_greedy_tokens_every_round": same[n][name]}
            print(f"  {name:13s} {show(fast)} / {show(med)} tok/s: {show(ratio(fast, hf_fast), 'x')} / "
                  f"{show(ratio(med, hf_med), 'x')} (goal >= 3x eager); same greedy tokens every round: "
                  f"{same[n][name]}")
        summary[str(n)] = row
    cfg = model.config
    values = cfg.kv_cache_values_per_token
    full = ModelConfig.from_yaml(os.path.join(ROOT, "config_smollm2_135.yaml"))
    print(f"KV cache per token per layer: {values} values ({values * 4} B fp32) for this model; the full config's "
          f"{full.kv_cache_values_per_token} vs SmolLM2-135M GQA 384 -> {full.kv_cache_values_per_token / 384:.3f}")
    out = {"command": " ".join(["python3", "bench/bench_decode.py", *(argv if argv is not None else sys.argv[1:])]),
           "model": what, "new_tokens": args.new, "rounds": args.rounds, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__, "compile_s": compile_s,
           "summary": summary, "per_round": rounds,
           "kv_cache_values_per_token_per_layer": values,
           "note": "decode-only rates; sides interleaved within each round; see each round's load average"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
