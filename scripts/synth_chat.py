"""Chat data written by the teacher itself (self-synthesis as in Magpie): the teacher is given its chat template's
prefix up to the start of a user turn and writes a question, then it answers that question under its own template.

    python3 scripts/synth_chat.py --teacher artifacts/smollm2-instruct --tokenizer ../shared/tokenizer \
        --out chat_data/smollm2_magpie.jsonl --conversations 240

Each JSONL line: {"messages": [user, assistant], "text": the conversation in the chat template, "batch": i} -- the
"text" field is what `train.py --data` reads. Rerunning the same command continues after the last finished batch
(batch i is sampled with seed + i, so the file is the same whether it was written in one go or resumed).
<out>.meta.json records the command, the teacher and the filter counts.

Filters (cheap, so that the student does not learn the teacher's failures): the question must end with the
end-of-turn token; an answer that runs out of tokens keeps its whole sentences (at least two, else it is dropped;
counted in the meta as "answers cut at a sentence"); the question is 3-60 words, the answer 3-250 words, no question twice (case-folded),
and the answer's distinct-2 (unique word bigrams / bigrams) >= 0.6, which drops repetition loops.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# openers for the user turn: the bare Magpie prefix makes a 135M teacher write mostly the same few questions;
# a first word nudges it towards the everyday questions a visitor of the Space asks
OPENERS = ["What", "How", "Why", "Can you explain", "What is the difference between", "Explain", "Give me",
           "Describe", "Tell me about", "Write", "What are", "How do", "Who", "When", "Is it", "What happens when"]


def distinct_2(text: str) -> float:
    words = text.split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 0.0


def load_teacher(path: str):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
           seed: int) -> list[tuple[str, bool]]:
    """-> per prompt (continuation text, ended with the end-of-turn token)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, eos_token_id=end, pad_token_id=tokenizer.pad_token_id)
    results = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ended = end in row
        row = row[:row.index(end)] if ended else row
        results.append((tokenizer.decode(row, skip_special_tokens=True).strip(), ended))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a transformers model directory or a .gguf file")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory with the chat template")
    p.add_argument("--out", required=True)
    p.add_argument("--conversations", type=int, default=240, help="stop once this many are kept")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--question-tokens", type=int, default=40)
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: beside a training run on 2 cores, two "
                   "threads that wait for each other at every op lose more than they gain)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_teacher(args.teacher)
    torch.set_num_threads(args.threads)
    user_prefix = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False).split("\x00")[0]

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    kept, batch, seen = 0, 0, set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                row = json.loads(line)
                kept += 1
                batch = max(batch, row["batch"] + 1)
                seen.add(row["messages"][0]["content"].casefold())
    meta_path = args.out + ".meta.json"
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"rejected": {}}
    meta.update(command="python3 " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
                teacher=args.teacher, tokenizer=args.tokenizer, openers=OPENERS, torch=torch.__version__)
    rejected = meta["rejected"]
    with open(args.out, "a") as out:
        while kept < args.conversations:
            t0 = time.time()
            openers = [OPENERS[(batch * args.batch_size + i) % len(OPENERS)] for i in range(args.batch_size)]
            questions = sample(model, tokenizer, [user_prefix + o for o in openers], args.question_tokens, 1.0, 0.95,
                               args.seed * 100003 + 2 * batch)
            candidates = []
            for opener, (rest, ended) in zip(openers, questions):
                question = (opener + rest if rest[:1] in (",", "?", "'") else f"{opener} {rest}").strip()
                words = len(question.split())
                reason = ("unfinished question" if not ended else "question length" if not 3 <= words <= 60
                          else "repeated question" if question.casefold() in seen else None)
                if reason:
                    rejected[reason] = rejected.get(reason, 0) + 1
                    continue
                seen.add(question.casefold())
                candidates.append(question)
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                     add_generation_prompt=True) for q in candidates]
            answers = sample(model, tokenizer, prompts, args.answer_tokens, 0.3, 0.9,
                             args.seed * 100003 + 2 * batch + 1) if prompts else []
            for question, (answer, ended) in zip(candidates, answers):
                if not ended:  # out of tokens: keep the whole sentences (the turn then ends after a full stop)
                    answer = answer[:answer.rfind(". ") + 1] if answer.count(". ") >= 2 else ""
                    rejected["answers cut at a sentence"] = rejected.get("answers cut at a sentence", 0) + bool(answer)
                words = len(answer.split())
                reason = ("unfinished answer" if not answer else "answer length" if not 3 <= words <= 250
                          else "repetitive answer" if distinct_2(answer) < 0.6 else None)
                if reason:
                    rejected[reason] = rejected.get(reason, 0) + 1
                    continue
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                text = tokenizer.apply_chat_template(messages, tokenize=False)
                out.write(json.dumps({"messages": messages, "text": text, "batch": batch}) + "\n")
                kept += 1
            out.flush()
            meta.update(kept=kept, batches=batch + 1)
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f, indent=1)
            os.replace(meta_path + ".tmp", meta_path)
            print(f"batch {batch}: kept {kept}/{args.conversations} ({time.time() - t0:.0f} s), rejected {rejected}",
                  flush=True)
            batch += 1


if __name__ == "__main__":
    main()
