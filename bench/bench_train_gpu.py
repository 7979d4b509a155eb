"""Training throughput on one GPU: ours vs transformers' DeepseekV3ForCausalLM (same config and weights) vs a dense
LlamaForCausalLM of SmolLM2-135M's shape, each eager and under torch.compile, in one process, with the same batch,
bf16 autocast and train.py's train_step (fused AdamW, clipping, finiteness check; balancing for ours).

    python bench/bench_train_gpu.py                       # config_smollm2_135.yaml, batch 16 x 1024, on cuda
    python bench/bench_train_gpu.py --device cpu --tiny --steps 1 --warmup 1 --out /tmp/t.json   # a smoke run

Writes results/train_gpu.json: device name, torch version, and per model tok/s, MFU (6 x active parameters x tok/s
over the bf16 GEMM peak probed in the same run) and peak memory. Only ratios within one run mean anything.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ModelConfig, read_yaml  # noqa: E402
from model import SmolLM2DeepSeek  # noqa: E402
from config import TrainConfig  # noqa: E402
from train import autocast_dtype, build_optimizer, gemm_peak_tflops, train_step  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32,
            max_position_embeddings=256)


def dense_llama(cfg: ModelConfig):
    """SmolLM2-135M's own shape (GQA 3 kv heads, SwiGLU of 1536 in every layer) at this config's width and depth."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = cfg.num_attention_heads
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True, rms_norm_eps=cfg.rms_norm_eps,
        attn_implementation="sdpa"))


def hf_loss(model, x, y):
    return model(input_ids=x, labels=y).loss  # transformers shifts the labels inside


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, model, flop_per_token, batch, cfg, device, amp_dtype, args, hf: bool):
    """Tokens per second of train_step on one fixed batch, after warmup steps (compilation included there)."""
    model.train()
    optimizer = build_optimizer(model, cfg, device)
    x, y = batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kwargs = dict(amp_dtype=amp_dtype, loss_fn=hf_loss) if hf else dict(amp_dtype=amp_dtype)
    # transformers shifts its labels inside: the full window gives it the same T targets as ours
    full = torch.cat([x, y[:, -1:]], dim=1)
    data = (lambda: (full, full)) if hf else (lambda: (x, y))
    try:
        first = train_step(model, optimizer, data, cfg, **kwargs).loss  # same weights: the same first loss
        for _ in range(args.warmup - 1):
            train_step(model, optimizer, data, cfg, **kwargs)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            result = train_step(model, optimizer, data, cfg, **kwargs)
        sync(device)
        seconds = (time.perf_counter() - start) / args.steps
    except Exception as err:  # a model that cannot run here (e.g. a compile failure) is reported, not fatal
        print(f"{name}: failed: {type(err).__name__}: {str(err)[:300]}")
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    tokens = x.numel()
    row = {"tok_per_s": tokens / seconds, "seconds_per_step": seconds, "first_loss": first, "loss": result.loss,
           "flop_per_token": flop_per_token,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    print(f"{name:28s} {row['tok_per_s']:10.0f} tok/s  {seconds * 1e3:8.1f} ms/step  loss {row['loss']:.3f}")
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config_smollm2_135.yaml")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test of the script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, at least 1 (compilation happens here)")
    p.add_argument("--no-compile", action="store_true", help="eager models only")
    p.add_argument("--only", nargs="+", help="measure only these rows (names as printed)")
    p.add_argument("--out", default="results/train_gpu.json")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    model_cfg = ModelConfig.from_dict(TINY) if args.tiny else ModelConfig.from_dict(read_yaml(args.config)["model"])
    seq = min(args.seq, model_cfg.max_position_embeddings)
    cfg = TrainConfig(lr=1e-4, warmup_steps=0, grad_accum_steps=1, batch_size=args.batch, seq_len=seq,
                      dtype="auto")
    amp_dtype = autocast_dtype(cfg, device)
    torch.manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (args.batch, seq + 1), device=device)
    batch = (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    peak = gemm_peak_tflops(device, amp_dtype)
    print(f"{device}: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, GEMM peak {peak:.1f} TFLOP/s, batch {args.batch} x {seq}, autocast {amp_dtype}")

    def ours():
        torch.manual_seed(0)
        return SmolLM2DeepSeek(model_cfg).to(device)

    def compiled_ours():
        model = ours()
        for block in model.model.layers:  # regional: one compiled graph per block, the chunked loss eager
            block.compile()
        return model

    def transformers_twin():
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            ours().save_pretrained(tmp)
            return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)

    def llama(compiled: bool):
        torch.manual_seed(0)
        model = dense_llama(model_cfg).to(device)
        return torch.compile(model) if compiled else model

    active = ours().count_parameters()["active"]
    candidates = [("ours eager", ours, False), ("transformers deepseek_v3", transformers_twin, True),
                  ("dense llama eager", lambda: llama(False), True)]
    if not args.no_compile:
        candidates += [("ours compiled (blocks)", compiled_ours, False),
                       ("dense llama compiled", lambda: llama(True), True)]
    rows = {}
    for name, build, hf in candidates:
        if args.only and name not in args.only:
            continue
        model = build()
        params = active if not name.startswith("dense") else sum(p.numel() for p in model.parameters())
        rows[name] = measure(name, model, 6 * params, batch, cfg, device, amp_dtype, args, hf)
        if "tok_per_s" in rows[name]:
            rows[name]["mfu"] = rows[name]["tok_per_s"] * rows[name]["flop_per_token"] / (peak * 1e12)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"command": " ".join(["python3", *sys.argv]),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": "tiny" if args.tiny else args.config,
              "batch": [args.batch, seq], "autocast": str(amp_dtype), "gemm_peak_tflops": peak, "models": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
