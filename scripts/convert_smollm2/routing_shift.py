"""What happens when balancing moves the dense-equivalent init's routing: per-document val loss of a checkpoint
with its e_score_correction_bias (a) as saved, (b) zeroed (routing by the learned router scores alone), (c) moved to
the untouched copies (experts 1 and 5 get the +1 instead of 0 and 4).
    OMP_NUM_THREADS=1 nice -n 19 python3 scripts/convert_smollm2/routing_shift.py DIR --out X.json
"""
import argparse, json, os, sys
import torch
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from convert_smollm2 import read_texts, token_sequences, mean_loss
from model import SmolLM2DeepSeek
from transformers import AutoTokenizer

p = argparse.ArgumentParser(); p.add_argument("dir"); p.add_argument("--out", required=True)
p.add_argument("--docs", type=int, default=35)
a = p.parse_args()
tok = AutoTokenizer.from_pretrained(a.dir)
model = SmolLM2DeepSeek.from_pretrained(a.dir).eval()
seqs, _ = token_sequences(read_texts("/work/shared/corpus/val.jsonl")[:a.docs], tok, 10 ** 12, 256)
saved = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers]
res = {"dir": a.dir, "docs": len(seqs), "bias_layer1_saved": saved[0].tolist()}
variants = {"as_saved": lambda b: b, "bias_zeroed": lambda b: torch.zeros_like(b),
            "moved_to_copies_1_5": lambda b: torch.tensor([0, 1, 0, 0, 0, 1, 0, 0], dtype=b.dtype)}
for name, f in variants.items():
    for m, b in zip(model.moe_layers, saved):
        m.gate.e_score_correction_bias.copy_(f(b))
    res[name] = round(mean_loss(model, seqs), 4)
    print(name, res[name], flush=True)
    json.dump(res, open(a.out, "w"), indent=1)
