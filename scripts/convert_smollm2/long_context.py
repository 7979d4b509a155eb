"""Long-context check: mean next-token loss by position bucket over packed 2048-token windows of val.jsonl.

    OMP_NUM_THREADS=2 nice -n 19 python3 scripts/convert_smollm2/long_context.py --model ours:DIR --out X.json
    OMP_NUM_THREADS=2 nice -n 19 python3 scripts/convert_smollm2/long_context.py --model gguf --out X.json

Packing: every document of val.jsonl tokenized (converted checkpoint's tokenizer, no special tokens), eos (id 0)
appended after each, concatenated, cut into consecutive non-overlapping windows of 2049 tokens (2048 inputs +
the next token as the last target). The loss at input index t (predicting token t+1) goes to the bucket holding t.
"""
import argparse, json, os, sys, time
import torch, torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from convert_smollm2 import read_texts, load_source  # reuse the conversion tool's loaders
from model import SmolLM2DeepSeek

BUCKETS = [(0, 256), (256, 512), (512, 1024), (1024, 2048)]

p = argparse.ArgumentParser()
p.add_argument("--model", required=True, help="ours:DIR, gguf, or gguf-rope:K[:S] (the GGUF Llama rotating only its "
               "rope pairs 0, S, ..., (K-1)S of 32, the others unrotated: convert_smollm2 --rope-stride S's "
               "frequencies with exact keys)")
p.add_argument("--tokenizer", default="/work/wt18/artifacts/converted_dense_eq")
p.add_argument("--val", default="/work/shared/corpus/val.jsonl")
p.add_argument("--window", type=int, default=2048)
p.add_argument("--max-windows", type=int, default=0)
p.add_argument("--out", required=True)
a = p.parse_args()

from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(a.tokenizer)
ids = []
for t in read_texts(a.val):
    ids += tok(t, add_special_tokens=False)["input_ids"] + [0]
ids = torch.tensor(ids)
n_win = (len(ids) - 1) // a.window
if a.max_windows:
    n_win = min(n_win, a.max_windows)
if a.model.startswith("gguf"):
    model, _, desc = load_source(None, None)
    if ":" in a.model:
        k, stride = (int(v) for v in (a.model.split(":")[1:] + ["1"])[:2])
        rot = model.model.rotary_emb
        kept = torch.zeros_like(rot.inv_freq, dtype=torch.bool)
        kept[torch.arange(k) * stride] = True
        rot.inv_freq[~kept] = 0.0
        desc["rotated_pairs"] = (torch.arange(k) * stride).tolist()
        desc["inv_freq_kept"] = rot.inv_freq[kept].tolist()
    fn = lambda x: model(x).logits
else:
    model = SmolLM2DeepSeek.from_pretrained(a.model.split(":", 1)[1]).eval()
    desc = {"kind": "ours", "path": a.model.split(":", 1)[1]}
    fn = model
sums = torch.zeros(a.window, dtype=torch.float64)
res = {"model": a.model, "source": desc, "val_tokens_packed": len(ids), "windows_available": (len(ids) - 1) // a.window,
       "window": a.window, "torch": torch.__version__, "threads": torch.get_num_threads()}
t0 = time.time()
with torch.no_grad():
    for w in range(n_win):
        chunk = ids[w * a.window: (w + 1) * a.window + 1]
        logits = fn(chunk[None, :-1]).float()[0]
        sums += F.cross_entropy(logits, chunk[1:], reduction="none").double()
        done = w + 1
        mean = sums / done
        res.update(windows_used=done, seconds=round(time.time() - t0, 1),
                   buckets={f"{lo}-{hi}": round(mean[lo:hi].mean().item(), 4) for lo, hi in BUCKETS},
                   overall=round(mean.mean().item(), 4),
                   per_128=[round(mean[i:i + 128].mean().item(), 4) for i in range(0, a.window, 128)])
        json.dump(res, open(a.out, "w"), indent=1)
        print(f"window {done}/{n_win} {time.time() - t0:.0f}s {res['buckets']}", flush=True)
