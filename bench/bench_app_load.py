"""Many visitors at once: time to first token and tokens/s of app.py's /generate for 1, 4 and 16 concurrent users.

    python bench/bench_app_load.py                          # checkpoints/final, workers 1 2 4, users 1 4 16
    python bench/bench_app_load.py --workers 2 --users 16 --tokens 48

Each user is its own gradio_client (its own session) calling /generate with the same prompt and settings, all
started together. TTFT = submit -> first streamed text; tokens/s = that user's tokens / (end - first token). The
machine's load average is recorded before and after: on a shared machine the figures move with other work.
Writes results/app_load.json.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def pct(values, q):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def one_round(url, users, tokens, prompt):
    import gradio_client

    clients = [gradio_client.Client(url, verbose=False) for _ in range(users)]
    results, start = [None] * users, threading.Barrier(users)

    def user(i):
        start.wait()
        t0 = time.perf_counter()
        first, last, n, busy = None, None, 0, False
        job = clients[i].submit(prompt, 0.8, 50, tokens, api_name="/generate")
        for out in job:
            now = time.perf_counter()
            if out[0] and first is None:
                first = now
            if isinstance(out[1], str) and "The Space is busy" in out[1]:
                busy = True
            if isinstance(out[4], dict):
                n = len(out[4]["tokens"])
            last = now
        final = job.result(timeout=600)
        if isinstance(final[4], dict):
            n = len(final[4]["tokens"])
        last = time.perf_counter()
        results[i] = {"ttft_s": None if first is None else first - t0, "total_s": last - t0, "tokens": n,
                      "tok_s": n / (last - first) if first is not None and last > first else None, "busy": busy}

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    served = [r for r in results if r and not r["busy"] and r["ttft_s"] is not None]
    ttft = [r["ttft_s"] for r in served]
    rates = [r["tok_s"] for r in served if r["tok_s"]]
    return {"users": users, "served": len(served), "busy": sum(bool(r and r["busy"]) for r in results),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "total_p50_s": pct([r["total_s"] for r in served], 0.5),
            "total_p95_s": pct([r["total_s"] for r in served], 0.95),
            "tok_s_per_user_p50": pct(rates, 0.5), "tok_s_aggregate": sum(r["tokens"] for r in served) / wall,
            "wall_s": wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.path.join(ROOT, "checkpoints", "final"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--max-waiting", type=int, default=32)
    parser.add_argument("--prompt", default="Photosynthesis is the process by which")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "app_load.json"))
    args = parser.parse_args()

    import socket

    import app
    import serve

    engine = serve.Engine(args.model_dir, workers=1, max_waiting=args.max_waiting)
    demo = app.build_demo(engine=engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    url = f"http://127.0.0.1:{port}/"
    load_before = os.getloadavg()
    rows = []
    try:
        one_round(url, 1, 8, args.prompt)  # warm-up
        for workers in args.workers:
            engine.admission = serve.Admission(workers, args.max_waiting)
            for users in args.users:
                row = {"workers": workers, **one_round(url, users, args.tokens, args.prompt)}
                rows.append(row)
                print(f"workers {workers:2d} users {users:3d}: TTFT p50 {row['ttft_p50_s']:.2f} s p95 "
                      f"{row['ttft_p95_s']:.2f} s; {row['tok_s_per_user_p50']:.1f} tok/s per user, "
                      f"{row['tok_s_aggregate']:.1f} aggregate; total p95 {row['total_p95_s']:.1f} s; "
                      f"busy {row['busy']}", flush=True)
    finally:
        demo.close()
    out = {"command": " ".join(["python3", *sys.argv]), "model_dir": serve.display_path(args.model_dir),
           "tokens_per_call": args.tokens, "prompt": args.prompt,
           "temperature": 0.8, "top_k": 50, "weights_dtype": engine.dtype_name, "cpu_count": os.cpu_count(),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "note": "2-core machine shared with other engineers' jobs: see the load averages", "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
