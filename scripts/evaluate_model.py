"""The Space model's report card: the measures issue 25 sets, for our checkpoints and for the source model alike.

    python3 scripts/evaluate_model.py checkpoints/final artifacts/smollm2-instruct --val ../shared/corpus/val.jsonl \
        --out results/heal/evaluation.json

Per model (a directory we wrote, or any transformers causal LM directory such as the exported teacher):
  val_first_256: mean next-token loss over the first 256 tokens of every document (convert_smollm2.py's measure,
                 the one the conversion's numbers use);
  long_context:  val packed into 1024-token windows (documents joined with eos), mean loss by input position
                 bucket 0-256 / 256-512 / 512-1024;
  questions:     greedy replies (64 new tokens, the tokenizer's chat template, stop at <|im_end|>) to everyday
                 questions, with distinct-2 of each reply (unique word bigrams / bigrams).
  run_val:       with --run-config, train.py's own validation loss (its config's batch, length and eval_batches
                 over --val, packed): the number training_summary.json records for our checkpoints.
Extra --holdout files are measured like val (first 256 tokens per document).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from convert_smollm2 import mean_loss, read_texts, token_sequences  # noqa: E402

QUESTIONS = ["What is photosynthesis?", "What does the heart do?", "Why is the sky blue?",
             "How do vaccines work?", "What is the capital of France?", "How can I sleep better?",
             "What causes rain?", "Why do we need to drink water?"]
BUCKETS = [(0, 256), (256, 512), (512, 1024)]


def load(path: str):
    """-> (logits_fn(ids [1, T]) -> [1, T, V], tokenizer, kind)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    config = json.load(open(os.path.join(path, "config.json")))
    if config.get("model_type") == "llama":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return (lambda ids: model(ids).logits), tokenizer, "transformers llama"
    from model import SmolLM2DeepSeek

    model = SmolLM2DeepSeek.from_pretrained(path).eval()
    return model, tokenizer, "ours"


def distinct_2(text: str) -> float:
    words = text.split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 0.0


@torch.no_grad()
def long_context(logits_fn, tokenizer, texts: list[str], window: int = 1024, max_windows: int = 24) -> dict:
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor(ids)
    n = min((len(ids) - 1) // window, max_windows)
    sums = torch.zeros(window, dtype=torch.float64)
    for w in range(n):
        chunk = ids[w * window:(w + 1) * window + 1]
        logits = logits_fn(chunk[None, :-1]).float()[0]
        sums += F.cross_entropy(logits, chunk[1:], reduction="none").double()
    per_position = sums / n
    return {"windows": n, "window": window,
            "buckets": {f"{a}-{b}": round(per_position[a:b].mean().item(), 4) for a, b in BUCKETS}}


@torch.no_grad()
def answer(logits_fn, tokenizer, question: str, max_new_tokens: int = 64) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for _ in range(max_new_tokens):  # full forward per token: slow but the same for every model measured
        token = int(logits_fn(ids)[0, -1].argmax())
        if token == end:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--val", required=True, help="val.jsonl (documents with a 'text' field)")
    p.add_argument("--holdout", nargs="*", default=[], help="more .jsonl files measured like --val")
    p.add_argument("--no-questions", action="store_true")
    p.add_argument("--no-long-context", action="store_true")
    p.add_argument("--run-config", help="a train.py YAML: also measure train.py's validation loss with its settings")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    results["command"] = "python3 " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:]))
    results.setdefault("models", {})
    for path in args.models:
        t0 = time.time()
        logits_fn, tokenizer, kind = load(path)
        texts = read_texts(args.val)
        seqs, _ = token_sequences(texts, tokenizer, 10 ** 12, 256)
        row = {"kind": kind, "val_first_256": round(mean_loss(logits_fn, seqs), 4)}
        if not args.no_long_context:
            row["long_context"] = long_context(logits_fn, tokenizer, texts)
        if args.run_config and kind == "ours":
            import data
            import train
            from config import TrainConfig, dataclass_from_dict, read_yaml

            cfg = dataclass_from_dict(TrainConfig, read_yaml(args.run_config)["train"], "train")
            tokens = data.tokenize_files([args.val], tokenizer)
            with torch.no_grad():
                row["run_val"] = round(train.evaluate(logits_fn, data.validation_batches(tokens, cfg),
                                                      torch.device("cpu"), None), 5)
            logits_fn.eval()
        for extra in args.holdout:
            seqs, _ = token_sequences(read_texts(extra), tokenizer, 10 ** 12, 256)
            row[f"holdout:{os.path.basename(extra)}"] = round(mean_loss(logits_fn, seqs), 4)
        if not args.no_questions:
            replies = {q: answer(logits_fn, tokenizer, q) for q in QUESTIONS}
            row["questions"] = {q: {"reply": r, "distinct_2": round(distinct_2(r), 3)} for q, r in replies.items()}
            row["mean_distinct_2"] = round(sum(distinct_2(r) for r in replies.values()) / len(replies), 3)
        row["seconds"] = round(time.time() - t0, 1)
        results["models"][path] = row
        print(json.dumps({path: row}, indent=1), flush=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
