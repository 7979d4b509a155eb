"""Shared pieces of the benchmarks: the reference config, a matmul-peak probe, a timer."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelConfig, SmolLM2DeepSeek  # noqa: E402
from train import gemm_peak_tflops  # noqa: E402

# The config on which transformers' DeepseekV3ForCausalLM was measured at ~78 tok/s training and ~29 tok/s greedy
# decoding (batch 4 x 128, AdamW) on a 2-core AVX2 EPYC; ~840 and ~76 tok/s on a 2-core Zen 4
REFERENCE = dict(vocab_size=49152, hidden_size=192, num_hidden_layers=4, num_attention_heads=4, kv_lora_rank=48,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
                 n_shared_experts=1, moe_intermediate_size=192, first_k_dense_replace=1, intermediate_size=576,
                 tie_word_embeddings=True, n_group=1, topk_group=1, max_position_embeddings=2048)


def ours(values: dict = REFERENCE, seed: int = 0) -> SmolLM2DeepSeek:
    torch.manual_seed(seed)
    return SmolLM2DeepSeek(ModelConfig.from_dict(dict(values)))


def transformers_twin(model: SmolLM2DeepSeek, path: str):
    """The same weights in transformers' DeepseekV3ForCausalLM (through the HF files, as a user would)."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def matmul_peak_gflops(n: int = 2048) -> float:
    """Best fp32 GEMM throughput of this CPU right now (2n^3 FLOP per n x n matmul), by train.py's probe."""
    return gemm_peak_tflops(torch.device("cpu"), torch.float32, n) * 1e3


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cpu_model() -> str:
    """The CPU's name and whether it has AVX-512 BF16 (/proc/cpuinfo), so a result says which machine made it: the
    project's 2-core VMs all call themselves "AMD EPYC", and differ in exactly that (DESIGN notes, README)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"{name} ({'AVX-512 BF16' if 'avx512_bf16' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'})"


def rss_gib() -> tuple[float, float]:
    """(resident now, peak resident) of this process in GiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kib = line.split()[:2]
                values[key] = int(kib) / 2 ** 20
    return values.get("VmRSS:", float("nan")), values.get("VmHWM:", float("nan"))
