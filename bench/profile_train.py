"""Profile a few training steps of a config (torch.profiler) and print the ops that dominate.

    python bench/profile_train.py --config config_cpu.yaml [--batch 4 --seq 256 --device cpu]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import ModelConfig, SmolLM2DeepSeek
from config import TrainConfig
from train import build_optimizer, train_step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="config_cpu.yaml")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    model = SmolLM2DeepSeek(ModelConfig.from_yaml(args.config)).to(device).train()
    cfg = TrainConfig(lr=1e-4)
    opt = build_optimizer(model, cfg, device)  # the trainer's optimiser and step
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), device=device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None

    def step():
        return train_step(model, opt, lambda: (ids[:, :-1], ids[:, 1:]), cfg, amp_dtype=amp_dtype).loss

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=50))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
