"""Quality per compute: our MLA + MoE model against a dense SmolLM2-style GQA model (transformers' Llama, the
architecture SmolLM2 uses) with the same number of ACTIVE parameters, trained on the same tokens, in the same order,
with the same optimiser and schedule. Prints and writes the validation losses of both.

    python bench/compare_dense.py --data data_cache/train.npy --val-data data_cache/val.npy --steps 500 \\
        [--config config_cpu.yaml] [--out results/dense_vs_moe]

--data / --val-data take what train.py takes (.jsonl, .txt or pre-tokenized .npy). The dense model's width and
depth are ours; its MLP width is chosen so that its parameter count matches our active count. Both models are fp32
on the CPU; the run is short (a comparison, not a trained model), and the tokens/s printed for the dense model are
transformers' eager speed, not a tuned baseline.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import TrainConfig  # noqa: E402
from data import build_data, load_tokenizer  # noqa: E402
from model import SmolLM2DeepSeek  # noqa: E402
from train import build_optimizer, load_configs, lr_at, model_loss, train_step  # noqa: E402


def dense_twin(ours: SmolLM2DeepSeek, kv_heads: int):
    """A Llama (SmolLM2's architecture: GQA attention, SwiGLU MLP, tied embeddings) with our width, depth and vocab,
    its MLP width solved so its parameters equal our active ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ours.config
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    heads = 3 * kv_heads  # SmolLM2-135M shares each key/value head between 3 query heads
    head_dim = d // heads
    attention = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
    fixed = cfg.vocab_size * d + L * (attention + 2 * d) + d
    target = ours.count_parameters()["active"]
    intermediate = max(8, round((target - fixed) / (3 * d * L) / 8) * 8)
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=intermediate, num_hidden_layers=L,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True, initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id))
    return dense


def dense_loss(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))


def train_one(name, model, loss_fn, cfg: TrainConfig, batches, val, log):
    """cfg.steps steps of train.py's train_step (the same step for both models; balancing for ours only)."""
    torch.manual_seed(cfg.seed)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    rows, tokens, start = [], 0, time.perf_counter()

    def val_loss():
        model.eval()
        with torch.no_grad():
            loss = sum(loss_fn(model, x, y).item() for x, y in val) / len(val)
        model.train()
        return loss

    model.train()
    for step in range(1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        result = train_step(model, opt, batches.next, cfg, loss_fn=loss_fn)
        tokens += cfg.batch_size * cfg.seq_len * cfg.grad_accum_steps
        if result.skipped:
            log(f"{name} step {step}: non-finite loss or gradient; update skipped")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = {"step": step, "train_loss": result.loss, "val_loss": val_loss(), "tokens": tokens,
                   "tokens_per_s": tokens / (time.perf_counter() - start)}
            rows.append(row)
            log(f"{name} step {step}: train {row['train_loss']:.3f} val {row['val_loss']:.3f} "
                f"({row['tokens_per_s']:.0f} tok/s)")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="config_cpu.yaml")
    p.add_argument("--data", required=True)
    p.add_argument("--val-data", required=True)
    p.add_argument("--tokenizer", default=None, help="needed only for .jsonl/.txt data")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--out", default="results/dense_vs_moe")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.txt")

    def log(msg):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    # train.py's loader (same validation); only the step count comes from the command line here
    overrides = dict.fromkeys(["extra_steps", "seed", "batch_size", "grad_accum_steps", "lr", "seq_len"])
    model_cfg, cfg = load_configs(SimpleNamespace(config=args.config, steps=args.steps, tokenizer=None,
                                                  no_balance=False, **overrides))
    cfg = dataclasses.replace(cfg, eval_every=args.eval_every, warmup_steps=min(cfg.warmup_steps, args.steps // 10))
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    data_args = SimpleNamespace(data=[args.data], val_data=[args.val_data])

    torch.manual_seed(cfg.seed)
    ours = SmolLM2DeepSeek(model_cfg)
    torch.manual_seed(cfg.seed)
    dense = dense_twin(ours, args.kv_heads)
    counts = ours.count_parameters()
    dense_params = sum(p.numel() for p in dense.parameters())
    log(f"budget: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.lr} {cfg.schedule}, "
        f"warmup {cfg.warmup_steps}, seed {cfg.seed}")
    log(f"ours (MLA + MoE): {counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active; "
        f"dense GQA (Llama, {dense.config.num_attention_heads} heads / {dense.config.num_key_value_heads} kv, "
        f"MLP {dense.config.intermediate_size}): {dense_params / 1e6:.2f}M")
    results = {}
    for name, model, loss_fn in [("moe", ours, model_loss), ("dense", dense, dense_loss)]:
        batches, val = build_data(data_args, cfg, tokenizer, 0, 1)  # same windows, same order for both
        results[name] = train_one(name, model, loss_fn, cfg, batches, val, log)
    summary = {
        "command": " ".join(["python3", *sys.argv]),
        "steps": cfg.steps, "tokens": results["moe"][-1]["tokens"],
        "moe": {"total_params": counts["total"], "active_params": counts["active"],
                "val_loss": results["moe"][-1]["val_loss"], "curve": results["moe"]},
        "dense": {"params": dense_params, "val_loss": results["dense"][-1]["val_loss"], "curve": results["dense"]},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"final val loss after {summary['tokens']:,} tokens: MLA+MoE {summary['moe']['val_loss']:.3f} vs dense GQA "
        f"{summary['dense']['val_loss']:.3f} (difference {summary['moe']['val_loss'] - summary['dense']['val_loss']:+.3f})")


if __name__ == "__main__":
    main()
