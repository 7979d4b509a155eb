"""The shipped model as the Space serves it: load time (serve.Engine: the dtype probe, the weights, the tokenizer),
resident memory, and one stream's greedy decoding after a 64-token prompt (generate(), the engine's decode loop).

    python3 bench/bench_shipped.py [--model checkpoints/final] [--new 128] [--rounds 3]

Goals (issue 25): load <= 30 s, >= 15 tokens/s for one stream, RSS <= 3 GB. Rounds alternate nothing (one model),
so each round's rate is reported with the machine's load average beside it; the minimum and median go in
results/shipped_decode.json.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from generate import generate  # noqa: E402
from serve import Engine  # noqa: E402


def current_rss_gib() -> float:
    """Resident memory now (VmRSS; ru_maxrss is the peak, which loading's dequantization sets)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20  # KiB -> GiB
    return float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "checkpoints", "final"))
    p.add_argument("--new", type=int, default=128, help="tokens generated per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "shipped_decode.json"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    engine = Engine(args.model)
    load_seconds = time.perf_counter() - t0
    if not engine.ok:
        raise SystemExit(f"error: {engine.error}")
    rss_after_load = current_rss_gib()
    prompt = engine.tokenizer("The water cycle describes how water moves between the oceans, the air and the land. "
                              * 8, add_special_tokens=False)["input_ids"][:64]
    rounds = []
    for _ in range(args.rounds):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        first = None
        n = 0
        for _step in generate(engine.model, prompt, max_new_tokens=args.new, temperature=0, eos_token_id=None):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        rounds.append({"tokens": n, "first_token_s": round(first - start, 3),
                       "decode_tokens_per_s": round((n - 1) / (end - first), 2),
                       "end_to_end_tokens_per_s": round(n / (end - start), 2), "load_average_1min": round(load, 2)})
        print(rounds[-1], flush=True)
    rates = [r["decode_tokens_per_s"] for r in rounds]
    result = {"command": "python3 " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
              "model": os.path.relpath(os.path.abspath(args.model), ROOT), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "weights_dtype": engine.dtype_name,
              "load_seconds": round(load_seconds, 2), "rss_gib_after_load": round(rss_after_load, 2),
              "rss_gib_peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
              "rss_gib_after_decoding": round(current_rss_gib(), 2),
              "prompt_tokens": len(prompt), "rounds": rounds, "decode_tokens_per_s_max": max(rates),
              "decode_tokens_per_s_median": statistics.median(rates)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))


if __name__ == "__main__":
    main()
