"""Write a small stand-in for train.jsonl that makes convert_smollm2.py pick exactly the same calibration tokens:
all N lines kept (so random.Random(seed).shuffle gives the same order), the documents it calibrates on truncated to
their first --chars characters (>= 256 tokens), every other document emptied. ~150 KB instead of 54 MB.
    python3 scripts/convert_smollm2/calibration_subset.py ../shared/corpus/train.jsonl TOKENIZER_DIR OUT.jsonl
"""
import json, os, random, sys
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from convert_smollm2 import read_texts, token_sequences
from transformers import AutoTokenizer

src, tokdir, out = sys.argv[1:4]
seed, tokens, seq_len, chars = 0, 8192, 256, 4000
tok = AutoTokenizer.from_pretrained(tokdir)
texts = read_texts(src)
order = list(range(len(texts)))
random.Random(seed).shuffle(order)
ref, used = token_sequences([texts[i] for i in order], tok, tokens, seq_len)
keep = set(order[:used])
small = [texts[i][:chars] if i in keep else "" for i in range(len(texts))]
with open(out, "w") as f:
    for t in small:
        f.write(json.dumps({"text": t}) + "\n")
# check: the stand-in yields the very same calibration sequences
texts2 = read_texts(out)
order2 = list(range(len(texts2)))
random.Random(seed).shuffle(order2)
got, _ = token_sequences([texts2[i] for i in order2], tok, tokens, seq_len)
assert len(got) == len(ref) and all((a == b).all() for a, b in zip(got, ref)), "calibration differs"
print(f"{out}: {os.path.getsize(out)} bytes, {len(texts2)} lines, {used} documents used, "
      f"{sum(s.numel() for s in got)} calibration tokens identical to the full file's")
