"""Many visitors at once through app.py's /generate: batched decoding (serve.Batcher) against per-stream decode loops.

    python3 bench/bench_app_load.py                                  # checkpoints/final, users 1 4 8 16, batch 16
    python3 bench/bench_app_load.py --batch 8 16 --users 1 4 8 16 --rounds 3 --tokens 48

Modes, all in one run on one loaded page: "per-stream" (each admitted stream its own decode loop, --workers at once:
the app before batching) and "batched <= B" for each --batch bound B (every running stream stepped in one forward,
up to B at once); with --compile also the app's own mode, the largest bound with a stream alone on the compiled
step (serve.Engine(compile_decoding=True)). In each round, for each number of users, every mode runs once, in an
order that rotates between rounds, so load from other work falls on all of them alike. Each user is its own
gradio_client (its own session), in a process apart from the server (as a Space's visitors are on other machines),
calling /generate with the same prompt and settings (greedy by default), all started together. First token = submit
-> first streamed text; tokens/s in total = all users' tokens / the round's wall time. The load average before and
after every row and the busiest processes at the start and end are recorded: on a shared machine the figures move
with other work. Writes results/app_load.json (every row, and per mode and users the median over rounds).
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import subprocess
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


def busiest_processes(n: int = 5) -> list[str]:
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,pid,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout
        return [" ".join(line.split()) for line in out.splitlines()[1:n + 1]]
    except (OSError, subprocess.SubprocessError):
        return []


def one_round(url, users, tokens, prompt, temperature, top_k):
    import gradio_client

    clients = [gradio_client.Client(url, verbose=False) for _ in range(users)]
    results, start = [None] * users, threading.Barrier(users)

    def user(i):
        start.wait()
        t0 = time.perf_counter()
        first, n, busy = None, 0, False
        job = clients[i].submit(prompt, temperature, top_k, tokens, api_name="/generate")
        for out in job:
            if out[0] and first is None:
                first = time.perf_counter()
            if isinstance(out[1], str) and "The Space is busy" in out[1]:
                busy = True
        final = job.result(timeout=1200)
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
            "tokens": sum(r["tokens"] for r in served), "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "total_p95_s": pct([r["total_s"] for r in served], 0.95), "tok_s_per_user_p50": pct(rates, 0.5),
            "tok_s_total": sum(r["tokens"] for r in served) / wall, "wall_s": wall}


def set_mode(engine, mode, workers, max_waiting):
    """Switch the running page's engine between per-stream loops (batch None) and a Batcher bound."""
    import serve

    batch = mode["batch"]
    engine.batcher = serve.Batcher(engine.model, batch, head=engine.head) if batch else None
    if mode.get("compiled"):
        engine.batcher.compiled_step = engine.compiled_step
    engine.admission = serve.Admission(batch or workers, max_waiting)


def summarize(rows, modes, users_list):
    """Per mode and users: the median over rounds; then the issue's goals for each batched mode."""
    table = {}
    for mode in modes:
        for users in users_list:
            picked = [r for r in rows if r["mode"] == mode["name"] and r["users"] == users]
            if not picked:
                continue
            med = {key: statistics.median([r[key] for r in picked if r[key] is not None] or [float("nan")])
                   for key in ("tok_s_total", "ttft_p50_s", "ttft_p95_s", "total_p95_s")}
            table.setdefault(mode["name"], {})[str(users)] = {**med, "rounds": len(picked),
                                                              "busy": sum(r["busy"] for r in picked)}
    goals = {}
    before = table.get("per-stream", {})
    for name, by_users in table.items():
        if name == "per-stream" or "1" not in by_users:
            continue
        one = by_users["1"]["tok_s_total"]
        goal = {}
        for users, target in (("4", 1.8), ("16", 2.5)):
            if users in by_users:
                goal[f"tok_s_{users}_users_over_1"] = {"ratio": by_users[users]["tok_s_total"] / one, "goal": target}
        if "16" in by_users and "16" in before:
            goal["ttft_p95_16_users_over_per_stream"] = {
                "ratio": by_users["16"]["ttft_p95_s"] / before["16"]["ttft_p95_s"], "goal_at_most": 0.5}
        goals[name] = goal
    return table, goals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.path.join(ROOT, "checkpoints", "final"))
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="batch bounds to measure")
    parser.add_argument("--workers", type=int, default=2, help="streams at once in per-stream mode (the app before)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-waiting", type=int, default=32)
    parser.add_argument("--prompt", default="Photosynthesis is the process by which")
    parser.add_argument("--compile", action="store_true",
                        help="also the app's own mode (`python app.py`): the largest batch bound with a stream alone "
                             "on the compiled step (compiled first, in the foreground: a minute warm, minutes cold)")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "app_load.json"))
    args = parser.parse_args(argv)

    import socket

    import torch

    import app
    import serve
    from common import cpu_model, rss_gib

    if max(args.batch) > app.QUEUE_WORKERS:
        parser.error(f"--batch above {app.QUEUE_WORKERS} (the page's concurrency limit, app.QUEUE_WORKERS) would be "
                     "capped by Gradio's queue")
    engine = serve.Engine(args.model_dir, max_waiting=args.max_waiting)
    if not engine.ok:
        sys.exit(f"cannot load {args.model_dir}: {engine.error}")
    compile_info = None
    if args.compile:
        engine.warm_up_compiled()
        compile_info = dict(engine.compiled)
        if engine.compiled_step is None:
            sys.exit(f"compiled decoding failed: {engine.compiled}")
    demo = app.build_demo(engine=engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    url = f"http://127.0.0.1:{port}/"
    # the visitors run in a process of their own, as a Space's visitors are on other machines: their clients'
    # threads (HTTP, SSE parsing) would otherwise compete with the server's decode loop for this process's GIL
    visitors = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    modes = [{"name": "per-stream", "batch": None}] + [{"name": f"batched <= {b}", "batch": b} for b in args.batch]
    if args.compile:
        modes.append({"name": f"batched <= {max(args.batch)}, compiled alone", "batch": max(args.batch),
                      "compiled": True})
    started = {"loadavg": os.getloadavg(), "busiest": busiest_processes()}
    rows, finished, failure = [], threading.Event(), []

    def drive():
        try:
            for mode in modes:  # warm-up: first calls, allocations, the batch loop's first start
                set_mode(engine, mode, args.workers, args.max_waiting)
                visitors.submit(one_round, url, 1, 4, args.prompt, args.temperature, args.top_k).result()
            for r in range(args.rounds):
                for users in args.users:
                    shift = (r + args.users.index(users)) % len(modes)
                    for mode in modes[shift:] + modes[:shift]:  # alternate who goes first
                        set_mode(engine, mode, args.workers, args.max_waiting)
                        load_before = os.getloadavg()
                        row = {"round": r, "mode": mode["name"],
                               **visitors.submit(one_round, url, users, args.tokens, args.prompt, args.temperature,
                                                 args.top_k).result(),
                               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
                        rows.append(row)
                        print(f"round {r + 1} {mode['name']:13s} users {users:3d}: first token p50 "
                              f"{row['ttft_p50_s']:.2f} s p95 {row['ttft_p95_s']:.2f} s; {row['tok_s_total']:.1f} "
                              f"tok/s in total; slowest call {row['total_p95_s']:.1f} s; busy {row['busy']}; load "
                              f"{load_before[0]:.2f} -> {row['loadavg_after'][0]:.2f}", flush=True)
        except BaseException as err:  # noqa: BLE001 (re-raised in the main thread)
            failure.append(err)
        finally:
            finished.set()

    threading.Thread(target=drive, name="bench-driver", daemon=True).start()
    try:
        while not finished.is_set():  # the batched decode loop in the main thread, as `python app.py` runs it
            batcher = engine.batcher
            if batcher is None:  # per-stream mode: each stream its own loop
                finished.wait(0.05)
                continue
            batcher.serve_forever(until=lambda: finished.is_set() or engine.batcher is not batcher)
    finally:
        visitors.shutdown()
        demo.close()
    if failure:
        raise failure[0]
    table, goals = summarize(rows, modes, args.users)
    for name, goal in goals.items():
        print(f"{name}: " + "; ".join(f"{key} {g['ratio']:.2f} (goal {'<=' if 'goal_at_most' in g else '>='} "
                                      f"{g.get('goal', g.get('goal_at_most'))})" for key, g in goal.items()))
    out = {"command": " ".join(["python3", "bench/bench_app_load.py", *(argv if argv is not None else sys.argv[1:])]),
           "model_dir": serve.display_path(args.model_dir), "tokens_per_call": args.tokens, "prompt": args.prompt,
           "temperature": args.temperature, "top_k": args.top_k, "weights_dtype": engine.dtype_name,
           "cpu_count": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
           "compiled_warm_up": compile_info,
           "per_stream_workers": args.workers, "modes": [m["name"] for m in modes],
           "start": started, "end": {"loadavg": os.getloadavg(), "busiest": busiest_processes()},
           "server_rss_peak_gib": round(rss_gib()[1], 3),
           "note": "2-core machine shared with other jobs: see each row's load average and the busiest processes",
           "median_over_rounds": table, "goals": goals, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
