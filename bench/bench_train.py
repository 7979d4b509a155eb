"""Training throughput: ours vs transformers' DeepseekV3ForCausalLM on the same config, batch and optimiser, plus
MFU against this machine's fp32 matmul peak measured in the same run.

    python bench/bench_train.py [--batch 4] [--seq 128] [--steps 3] [--repeats 3]
"""
import argparse
import tempfile

import torch

from common import REFERENCE, best_time, matmul_peak_gflops, ours, transformers_twin
from config import TrainConfig
from train import build_optimizer, train_step


def hf_loss(model, x, y):
    return model(input_ids=x, labels=y).loss  # transformers shifts the labels inside


def train_step_fn(model, ids, hf: bool):
    """One step of train.py's train_step (its AdamW: fused, no decay on norms/embedding; clipping, the finiteness
    check, and for ours the loss-free balancing update) on a fixed batch."""
    cfg = TrainConfig(lr=1e-4)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    model.train()
    if hf:
        return lambda: train_step(model, opt, lambda: (ids, ids), cfg, loss_fn=hf_loss)
    return lambda: train_step(model, opt, lambda: (ids[:, :-1], ids[:, 1:]), cfg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best of each model is kept")
    args = p.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, REFERENCE["vocab_size"], (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    model = ours()
    with tempfile.TemporaryDirectory() as tmp:
        hf = transformers_twin(model, tmp)
    peaks = [matmul_peak_gflops()]
    # both run args.seq positions per row: transformers shifts its labels inside
    steps = {"transformers": train_step_fn(hf, ids[:, :args.seq], True), "ours": train_step_fn(model, ids, False)}
    best = {name: float("inf") for name in steps}
    for _ in range(args.repeats):  # alternate the two, so a change in the machine's load hits both alike
        for name, step in steps.items():
            best[name] = min(best[name], best_time(lambda: [step() for _ in range(args.steps)], repeats=1))
        peaks.append(matmul_peak_gflops())  # the peak is probed between repeats too; MFU uses the highest
    results = {name: tokens * args.steps / seconds for name, seconds in best.items()}
    peak = max(peaks)
    counts = model.count_parameters()
    # 6 FLOP per active parameter per token; the tied embedding counts once, as the lm_head matmul it also is
    flop_per_token = 6 * counts["active"]
    mfu = results["ours"] * flop_per_token / (peak * 1e9)
    print(f"config: the reference shape (d 192, 4 layers, 8 experts top-2 + shared), batch {args.batch} x {args.seq}")
    print(f"fp32 matmul peak (2048^2 GEMM, best of 5, probed {len(peaks)} times): "
          f"{' / '.join(f'{p:.0f}' for p in peaks)} GFLOP/s; MFU uses {peak:.1f}")
    print(f"transformers training: {results['transformers']:.1f} tok/s")
    print(f"ours training:         {results['ours']:.1f} tok/s")
    print(f"ratio ours / transformers: {results['ours'] / results['transformers']:.2f}x  (goal >= 2x)")
    print(f"ours MFU: {100 * mfu:.1f}% of the measured peak ({flop_per_token / 1e6:.1f} MFLOP/token)")


if __name__ == "__main__":
    main()
