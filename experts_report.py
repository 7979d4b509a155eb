"""What each routed expert learned: over a fixed sample text, the tokens every MoE layer's experts take most often.

    python experts_report.py                          # the app's model: $MODEL_DIR, else checkpoints/final
    python experts_report.py runs/x/final --top 12    # another checkpoint -> runs/x/final/experts.json

Run it whenever the checkpoint's weights change: the JSON stores their SHA-256 and app.py shows a report only
for the weights it was computed from (a stale one is named as such). The sample text is written below (a few
paragraphs in the style of the textbooks the model was trained on, plus the app's example prompts), so the report
is reproducible anywhere and needs no corpus. One forward pass over ~1.5k tokens: a second or two on 2 CPU cores
for the shipped model.
"""
import argparse
import json
import os
import time
from collections import Counter

import torch

from model import SmolLM2DeepSeek
from serve import DEFAULT_MODEL_DIR, weights_sha256  # the same digest app.py checks

SAMPLE_NAME = "12 short textbook-style paragraphs on science, economics, history, maths and study skills"
SAMPLE = [
    "Photosynthesis is the process by which green plants use light energy to make sugar from carbon dioxide and "
    "water. It takes place in the chloroplasts, where chlorophyll absorbs red and blue light. Oxygen is released "
    "as a by-product, and the sugar is stored as starch or used to build cellulose.",
    "By the end of this section, you will be able to: describe the structure of an atom; explain how electrons "
    "are arranged in shells; and predict how two elements will bond. An atom has a small, dense nucleus of protons "
    "and neutrons, surrounded by electrons that carry a negative charge.",
    "The law of demand states that, other things being equal, the quantity of a good that buyers want falls as its "
    "price rises. A demand curve therefore slopes downward. When incomes grow or tastes change, the whole curve "
    "shifts, and economists distinguish this shift from a movement along the curve.",
    "In the early nineteenth century, the United States expanded rapidly westward. The Louisiana Purchase of 1803 "
    "doubled the size of the country, and new roads, canals and later railroads tied farms in the Ohio Valley to "
    "markets in the East. These changes reshaped politics, labor and the lives of Native American nations.",
    "A good way to prepare for an exam is to space out your study sessions over several days rather than cramming "
    "the night before. Test yourself with practice questions, explain the main ideas aloud in your own words, and "
    "sleep well: memories are consolidated while you rest.",
    "To solve the equation 3x + 7 = 22, subtract 7 from both sides to get 3x = 15, then divide both sides by 3. "
    "The solution is x = 5. Check the answer by substituting it back: 3(5) + 7 = 22. A linear function such as "
    "f(x) = 2x - 1 has a constant rate of change, its slope.",
    "Newton's second law says that the net force on an object equals its mass times its acceleration, F = ma. A "
    "force of 10 newtons acting on a 2-kilogram cart produces an acceleration of 5 meters per second squared. "
    "Friction acts in the direction opposite to the motion.",
    "Cells are the basic units of life. Prokaryotic cells, such as bacteria, lack a nucleus, while eukaryotic cells "
    "keep their DNA inside a membrane-bound nucleus. Mitochondria release energy from food through cellular "
    "respiration, producing ATP that powers the cell.",
    "Supply and demand together determine the equilibrium price in a competitive market. If the price is above "
    "equilibrium, there is a surplus and sellers cut prices; if it is below, a shortage pushes prices up. Taxes and "
    "price ceilings can keep a market away from equilibrium.",
    "The French Revolution began in 1789, when financial crisis and food shortages led the Estates-General to meet "
    "for the first time in more than a century. The Declaration of the Rights of Man and of the Citizen proclaimed "
    "that all men are born free and equal in rights.",
    "Psychologists study how people think, feel and behave. Classical conditioning, described by Ivan Pavlov, "
    "pairs a neutral stimulus with one that already produces a response; after several pairings, the neutral "
    "stimulus alone produces the response.",
    "In a right triangle, the square of the hypotenuse equals the sum of the squares of the other two sides: "
    "a^2 + b^2 = c^2. For example, a triangle with legs of 3 cm and 4 cm has a hypotenuse of 5 cm. The sine of an "
    "angle is the ratio of the opposite side to the hypotenuse.",
]




@torch.inference_mode()
def expert_report(model: SmolLM2DeepSeek, tokenizer, texts=SAMPLE, top: int = 8) -> dict:
    """For every MoE layer and routed expert: the tokens most often routed to it over `texts`, each with its share
    of the expert's load and the fraction of that token's occurrences that went there. One forward per text."""
    cfg = model.config
    E = cfg.n_routed_experts
    moe_layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    counts = [[Counter() for _ in range(E)] for _ in moe_layers]  # [layer][expert] token id -> times routed
    seen = Counter()  # token id -> occurrences in the sample
    n_tokens = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: cfg.max_position_embeddings]
        if not ids:
            continue
        routing = []
        model.hidden_states(torch.tensor([ids], device=model.lm_head.weight.device), routing=routing)
        seen.update(ids)
        n_tokens += len(ids)
        for pos, (experts, _) in enumerate(routing):
            for token_id, picked in zip(ids, experts[0].tolist()):
                for e in picked:
                    counts[pos][e][token_id] += 1
    layers = []
    for pos, layer in enumerate(moe_layers):
        experts = []
        for e in range(E):
            load = sum(counts[pos][e].values())
            best = sorted(counts[pos][e].items(), key=lambda kv: (-kv[1], kv[0]))[:top]
            experts.append({"expert": e, "load": load, "top": [
                {"id": tid, "token": tokenizer.decode([tid]), "count": c, "share": round(c / load, 4),
                 "of_token": round(c / seen[tid], 4)} for tid, c in best]})
        layers.append({"layer": layer, "experts": experts})
    return {"sample": {"name": SAMPLE_NAME, "texts": len(texts), "tokens": n_tokens},
            "experts_per_token": cfg.num_experts_per_tok, "n_routed_experts": E, "layers": layers}


def write_report(model_dir: str, top: int = 8, out: str | None = None) -> str:
    from transformers import AutoTokenizer

    model = SmolLM2DeepSeek.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    report = {"weights_sha256": weights_sha256(model_dir), **expert_report(model, tokenizer, top=top)}
    out = out or os.path.join(model_dir, "experts.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    os.replace(tmp, out)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default=os.environ.get("MODEL_DIR") or DEFAULT_MODEL_DIR,
                        help="the checkpoint directory (default: the one app.py serves: $MODEL_DIR, else "
                             "checkpoints/final)")
    parser.add_argument("--top", type=int, default=8, help="tokens listed per expert (default 8)")
    parser.add_argument("--out", default=None, help="default: <model_dir>/experts.json")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    t0 = time.perf_counter()
    out = write_report(args.model_dir, args.top, args.out)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
