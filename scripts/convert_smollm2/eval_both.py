"""Both validation measures for a model directory (ours / deepseek_v3 format):
  per_doc: mean next-token loss over the first 256 tokens of each of val.jsonl's 35 documents (convert_smollm2.py's
           token_sequences + mean_loss, as its --eval);
  packed:  train.py's own val loss (data.validation_batches + train.evaluate: the first eval_batches x batch_size consecutive
           packed seq_len windows of val.jsonl).
    OMP_NUM_THREADS=2 nice -n 19 python3 scripts/convert_smollm2/eval_both.py DIR [DIR ...] --out X.json
"""
import argparse, json, os, sys, time
import torch
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from convert_smollm2 import read_texts, token_sequences, mean_loss
import data
import train
from model import SmolLM2DeepSeek
from transformers import AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("dirs", nargs="+")
p.add_argument("--val", default="/work/shared/corpus/val.jsonl")
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--seq-len", type=int, default=256)
p.add_argument("--eval-batches", type=int, default=8)
p.add_argument("--out", required=True)
a = p.parse_args()
res = {}
for d in a.dirs:
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d)
    model = SmolLM2DeepSeek.from_pretrained(d).eval()
    seqs, _ = token_sequences(read_texts(a.val), tok, 10 ** 12, 256)
    per_doc = mean_loss(model, seqs)
    cfg = train.TrainConfig(batch_size=a.batch_size, seq_len=a.seq_len, eval_batches=a.eval_batches)
    vb = data.validation_batches(data.tokenize_files([a.val], tok), cfg)
    with torch.no_grad():
        packed = train.evaluate(model, vb, torch.device("cpu"), None)
    res[d] = {"per_doc": round(per_doc, 4), "per_doc_docs": len(seqs),
              "per_doc_predicted_tokens": sum(s.numel() - 1 for s in seqs),
              "packed": round(packed, 4), "packed_windows": sum(x.shape[0] for x, _ in vb), "seconds": round(time.time() - t0)}
    print(d, res[d], flush=True)
    json.dump(res, open(a.out, "w"), indent=1)
