"""Decoding at long context (issue 22): the per-token cost of one greedy step and the bytes its cache holds, at
contexts 256 ... 8192, for ours all-MLA, ours KDA + MLA hybrid (3 KDA : 1 MLA, MLA last), and the same weights in
transformers' DeepseekV3ForCausalLM and KimiLinearForCausalLM (loaded from our saved files), in one run.

    python bench/bench_long_decode.py                          # REFERENCE-sized models, writes results/long_decode.json
    python bench/bench_long_decode.py --tiny --contexts 32 64 --steps 3 --out /tmp/l.json      # a smoke run

The caches are filled synthetically (random latents, keys and states: what a step costs does not depend on what
they hold), then each model takes `--steps` one-token steps, each timed alone (wall clock and process CPU time);
the median is reported. A step is what a decoding loop does per token: the model over one token with its cache,
then the logits of that token. Ours steps as generate.Decoder does (absorbed MLA, "direct" experts, the KDA
recurrent form, its DecodeHead); transformers' as generate does (its DynamicCache, which concatenates each new entry).
Only ratios within one run mean anything; the machine's load is recorded beside them.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REFERENCE, ModelConfig, SmolLM2DeepSeek, cpu_model  # noqa: E402
from generate import DecodeHead  # noqa: E402
from model import LatentCache  # noqa: E402

LIN, FULL = "linear_attention", "full_attention"
CONTEXTS = [256, 1024, 2048, 4096, 8192]
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)


def build(values: dict, hybrid: bool, max_positions: int) -> SmolLM2DeepSeek:
    values = dict(values, max_position_embeddings=max_positions)
    if hybrid:  # Kimi Linear's 3 : 1, the last layer MLA; KDA as wide as the model
        L, heads = values["num_hidden_layers"], values["num_attention_heads"]
        values.update(layer_types=[FULL if i % 4 == 3 or i == L - 1 else LIN for i in range(L)],
                      linear_num_heads=heads, linear_head_dim=values["hidden_size"] // heads)
    torch.manual_seed(0)
    return SmolLM2DeepSeek(ModelConfig.from_dict(values)).eval()


def timed(step, n: int) -> tuple[float, float]:
    """Median wall and CPU seconds of n calls of step() (one warm-up call first)."""
    step()
    wall, cpu = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def ours_row(model: SmolLM2DeepSeek, context: int, steps: int) -> dict:
    cfg = model.config
    cache = LatentCache(cfg, 1, context + steps + 2, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    cache.kv.normal_(generator=gen)
    cache.conv.normal_(generator=gen)
    cache.state.normal_(0, 0.1, generator=gen)
    bytes_at_context = LatentCache(cfg, 1, context, "meta", torch.float32).nbytes()
    head = DecodeHead(model.lm_head.weight)
    pos = [context]
    token = torch.tensor([[1]])

    def step():
        h = model.hidden_states(token, cache, pos[0], attn_impl="absorb", expert_impl="direct")
        token[0, 0] = int(head(h[:, -1]).argmax())
        pos[0] += 1

    with torch.inference_mode():
        wall, cpu = timed(step, steps)
    return {"step_ms": wall * 1e3, "step_cpu_ms": cpu * 1e3, "cache_bytes": bytes_at_context}


def cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers cache holds (attention keys/values, linear-attention states)."""
    total, seen = 0, set()
    for layer in cache.layers:
        tensors = [getattr(layer, name, None) for name in ("keys", "values")]
        for name in ("conv_states", "recurrent_states"):
            held = getattr(layer, name, None)
            tensors += list(held.values() if isinstance(held, dict) else held or [])
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def transformers_row(hf, context: int, steps: int) -> dict:
    """Prefill 4 real tokens (so every cache layer exists), then replace each attention layer's entries by random
    ones of the context's length and step from there."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        hf(torch.tensor([[1, 2, 3, 4]]), past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 4 and t.numel():
                    setattr(layer, name, torch.randn(t.shape[0], t.shape[1], context, t.shape[3], generator=gen))
        assert cache.get_seq_length() == context, cache.get_seq_length()
        bytes_at_context = cache_bytes(cache)
        token = torch.tensor([[1]])

        def step():
            out = hf(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token[0, 0] = int(out.logits[0, -1].argmax())

        wall, cpu = timed(step, steps)
    return {"step_ms": wall * 1e3, "step_cpu_ms": cpu * 1e3, "cache_bytes": bytes_at_context}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    p.add_argument("--steps", type=int, default=16, help="timed one-token steps per model and context")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke runs)")
    p.add_argument("--no-transformers", action="store_true", help="ours only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 "results", "long_decode.json"))
    args = p.parse_args()
    values = TINY if args.tiny else REFERENCE
    max_positions = max(args.contexts) + args.steps + 8
    models = {"ours all-MLA": build(values, False, max_positions), "ours hybrid": build(values, True, max_positions)}
    twins = {}
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        for ours_name, twin_name in [("ours all-MLA", "transformers deepseek_v3"),
                                     ("ours hybrid", "transformers kimi_linear")]:
            with tempfile.TemporaryDirectory() as tmp:
                models[ours_name].save_pretrained(tmp)
                twins[twin_name] = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    rows = {name: {} for name in [*models, *twins]}
    for context in args.contexts:
        for name, model in models.items():
            rows[name][context] = ours_row(model, context, args.steps)
        for name, hf in twins.items():
            rows[name][context] = transformers_row(hf, context, args.steps)
        print(f"context {context}: " + "; ".join(f"{name} {r[context]['step_ms']:.2f} ms "
                                                   f"({r[context]['cache_bytes'] / 1e6:.2f} MB)"
                                                   for name, r in rows.items()), flush=True)
    longest = max(args.contexts)
    at = {name: r[longest] for name, r in rows.items()}
    goals = {"hybrid cache <= 0.3x all-MLA": at["ours hybrid"]["cache_bytes"] / at["ours all-MLA"]["cache_bytes"],
             "hybrid step / all-MLA step (wall, goal <= 1)": at["ours hybrid"]["step_ms"] / at["ours all-MLA"]["step_ms"]}
    if twins:
        goals["kimi_linear twin / ours hybrid (wall, goal >= 3)"] = (at["transformers kimi_linear"]["step_ms"] /
                                                                    at["ours hybrid"]["step_ms"])
        goals["kimi_linear twin / ours hybrid (CPU time, goal >= 3)"] = (at["transformers kimi_linear"]["step_cpu_ms"]
                                                                        / at["ours hybrid"]["step_cpu_ms"])
    for goal, value in goals.items():
        print(f"at {longest}: {goal}: {value:.3f}")
    result = {"config": "tiny" if args.tiny else "REFERENCE (bench/common.py)", "contexts": args.contexts,
              "steps": args.steps, "torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), "layer_types_hybrid": models["ours hybrid"].config.layer_types,
              "models": rows, f"ratios_at_{longest}": goals}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
