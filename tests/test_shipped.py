"""The shipped model in checkpoints/final: SmolLM2-135M-Instruct converted to MLA + MoE and healed by train.py's two
phases. It is the model its record describes (it reproduces the recorded validation loss of its small storage),
its weights fit the budget, transformers gets it through the documented export with our logits, its tokenizer is
SmolLM2's own (digits split, chat template), and its training record and card ship beside it."""
import json
import os

import pytest
import torch

import quantize
from conftest import CORPUS_DIR, ROOT, needs_corpus, read_jsonl
from model import SmolLM2DeepSeek

FINAL = os.path.join(ROOT, "checkpoints", "final")
EVALUATION = os.path.join(ROOT, "results", "heal", "evaluation.json")


def shipped_evaluation() -> dict:
    return json.load(open(EVALUATION))["models"]["checkpoints/final"]


def test_shipped_checkpoint_is_complete_and_small():
    files = set(os.listdir(FINAL))
    assert {"config.json", quantize.QUANTIZED_FILE, "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "training_summary.json", "README.md"} <= files
    weights = [f for f in files if f.endswith(".safetensors")]
    assert sum(os.path.getsize(os.path.join(FINAL, f)) for f in weights) <= 220e6
    summary = json.load(open(os.path.join(FINAL, "training_summary.json")))
    assert summary["step"] == 140  # config_heal.yaml: 90 steps, then 50 more from the step-90 checkpoint
    card = open(os.path.join(FINAL, "README.md")).read()
    assert "SmolLM2-135M-Instruct" in card and "apache-2.0" in card.lower()


def test_shipped_tokenizer_is_smollm2s_own():
    """transformers' GGUF conversion drops SmolLM2's one-digit pre-tokenizer; the shipped tokenizer keeps it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FINAL)
    assert len(tok("1234", add_special_tokens=False)["input_ids"]) == 4
    assert tok.chat_template and tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_transformers_gets_the_shipped_model_through_the_export(tmp_path):
    """`python3 quantize.py export checkpoints/final DIR` writes what AutoModelForCausalLM loads: same logits as
    ours (fp32 export, exact; bf16, the default, within bf16's rounding) and the same greedy continuation."""
    transformers = pytest.importorskip("transformers")
    ours = SmolLM2DeepSeek.from_pretrained(FINAL)
    tok = transformers.AutoTokenizer.from_pretrained(FINAL)
    ids = torch.tensor([tok("The main causes of inflation are rising costs and")["input_ids"]])
    quantize.main(["export", FINAL, str(tmp_path / "fp32"), "--dtype", "float32"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    loss = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:])
    assert loss.item() < 4.0  # a healed model: far from the 13M stand-in's ~5 and uniform's 10.8


def test_training_record_ships_beside_the_model():
    out = os.path.join(ROOT, "checkpoints")
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert rows[-1]["step"] == 140 and rows[-1]["max_vio"]
    samples = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert sorted({s["step"] for s in samples}) == [30, 60, 90, 120, 140]
    assert os.path.getsize(os.path.join(out, "training_plot.png")) > 10_000


@needs_corpus
def test_shipped_model_reproduces_its_recorded_validation_loss(tmp_path, monkeypatch):
    """The shipped (dequantized) weights give the validation loss recorded for them in results/heal/evaluation.json
    on the run's own validation batches (config_heal.yaml's length and count over val.jsonl); a different or damaged
    checkpoint would not."""
    import data
    import train
    from config import TrainConfig, dataclass_from_dict, read_yaml

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # tokenize afresh, never a cached file
    cfg = dataclass_from_dict(TrainConfig, read_yaml(os.path.join(ROOT, "config_heal.yaml"))["train"], "train")
    model = SmolLM2DeepSeek.from_pretrained(FINAL)
    tokens = data.tokenize_files([os.path.join(CORPUS_DIR, "val.jsonl")], data.load_tokenizer(FINAL))
    loss = train.evaluate(model, data.validation_batches(tokens, cfg), torch.device("cpu"), None)
    assert loss == pytest.approx(shipped_evaluation()["run_val"], abs=2e-3)
