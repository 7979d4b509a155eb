"""The shipped model as the Space serves it: load time, memory, and one stream's greedy decode speed.

    python3 bench/bench_shipped.py [--model checkpoints/final] [--prompt 64] [--new 128] [--rounds 3] [--compile]
        [--out results/heal/shipped_decode.json]

Load goes through `serve.Engine` (the app's path: the start-up dtype probe, then `from_pretrained` of the small
storage, dequantized once); the stream through `generate.Decoder`, the app's decode loop, after a prompt of
`--prompt` tokens of a textbook-like sentence. Tokens/s is decode only: the first token (the prompt's prefill) is
timed apart. RSS is this process's resident memory after load and its peak (/proc/self/status). The load average
is recorded before and after: on a shared 2-core machine any other process halves these numbers.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TEXT = ("Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical "
        "energy. In the chloroplasts, chlorophyll absorbs mostly red and blue light, and the energy splits water "
        "into oxygen, protons and electrons. ")


def one_stream(decoder, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(first-token seconds, decode tokens/s after it, the tokens) of one greedy stream."""
    start = time.perf_counter()
    tokens, first = [], None
    for t in decoder.stream(prompt, max_new_tokens=new, eos_token_id=None):
        tokens.append(t.token_id)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (len(tokens) - 1) / (end - first), tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "checkpoints", "final"))
    p.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=128, help="tokens decoded per stream")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also measure the compiled decoder (minutes of warm-up)")
    p.add_argument("--out", help="write the result here as JSON")
    args = p.parse_args(argv)
    import torch

    from common import cpu_model, rss_gib
    from generate import Decoder
    from serve import Engine

    load_before = os.getloadavg()
    start = time.perf_counter()
    engine = Engine(args.model)
    load_s = time.perf_counter() - start
    if not engine.ok:
        raise SystemExit(f"the model did not load: {engine.error}")
    rss_after_load, _ = rss_gib()
    prompt = engine.tokenizer(TEXT * (1 + args.prompt // 40))["input_ids"][:args.prompt]
    result = {"command": "python3 " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
              "model": os.path.relpath(os.path.abspath(args.model), ROOT), "dtype": engine.dtype_name,
              "torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
              "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
              "rss_after_load_gib": round(rss_after_load, 3), "prompt_tokens": len(prompt), "new_tokens": args.new}
    decoders = {"eager": Decoder(engine.model)}
    if args.compile:
        start = time.perf_counter()
        decoders["compiled"] = Decoder(engine.model, compile=True)
        one_stream(decoders["compiled"], prompt, 8)  # compiles
        result["compile_warmup_s"] = round(time.perf_counter() - start, 1)
    reference = None
    for name, decoder in decoders.items():
        firsts, rates = [], []
        for _ in range(args.rounds):
            first, rate, tokens = one_stream(decoder, prompt, args.new)
            firsts.append(first)
            rates.append(rate)
            reference = reference or tokens
            if tokens != reference:
                raise SystemExit(f"{name} decoding gave other tokens than the first run: not comparable")
        result[name] = {"tokens_per_s_best": round(max(rates), 2), "tokens_per_s_median": round(
            statistics.median(rates), 2), "first_token_s_median": round(statistics.median(firsts), 3)}
        print(f"{name}: {max(rates):.1f} tok/s best, {statistics.median(rates):.1f} median over {args.rounds} "
              f"rounds; first token {statistics.median(firsts):.2f} s", flush=True)
    result["rss_peak_gib"] = round(rss_gib()[1], 3)
    result["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(f"load {load_s:.1f} s, RSS {rss_after_load:.2f} GiB after load, {result['rss_peak_gib']:.2f} GiB peak, "
          f"{result['dtype']}, load average {result['loadavg_before_after']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
