"""The shipped model in checkpoints/final: SmolLM2-135M-Instruct converted to MLA + MoE and healed by train.py's two
phases (config_heal.yaml). It is the model its training record describes (the packed weights reproduce the
validation loss measured on them), within the quality bar of the fp32 run, small enough for git, with SmolLM2's own
tokenizer and chat template, and transformers gets it through `quantize.py export` with our logits."""
import json
import os

import pytest
import torch

from conftest import CORPUS_DIR, ROOT, needs_corpus, read_jsonl
from model import SmolLM2DeepSeek

FINAL = os.path.join(ROOT, "checkpoints", "final")
EVALUATION = os.path.join(ROOT, "results", "heal", "evaluation.json")
RUN_CONFIG = os.path.join(ROOT, "config_heal.yaml")


def shipped_row() -> dict:
    """results/heal/evaluation.json's measures of the shipped (packed) checkpoint."""
    return json.load(open(EVALUATION))["models"]["checkpoints/final"]


def test_shipped_checkpoint_is_complete_small_and_the_finished_two_phase_run():
    import quantize
    from config import TrainConfig, dataclass_from_dict, read_yaml

    files = set(os.listdir(FINAL))
    assert {"config.json", quantize.QUANTIZED_FILE, "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "training_summary.json", "experts.json", "README.md"} <= files
    assert "model.safetensors" not in files  # one storage only: the small one
    weights = sum(os.path.getsize(os.path.join(FINAL, f)) for f in files if f.endswith(".safetensors"))
    assert weights <= 220e6
    cfg = dataclass_from_dict(TrainConfig, read_yaml(RUN_CONFIG)["train"], "train")
    summary = json.load(open(os.path.join(FINAL, "training_summary.json")))
    assert summary["step"] == cfg.steps + cfg.extra_steps  # phase 1, then phase 2 from its checkpoint
    card = open(os.path.join(FINAL, "README.md")).read()
    assert "license: apache-2.0" in card and "SmolLM2-135M-Instruct" in card  # provenance and licence


def test_shipped_tokenizer_is_smollm2s_own_with_its_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FINAL)
    assert len(tokenizer("1234", add_special_tokens=False)["input_ids"]) == 4  # one digit a token, as SmolLM2's
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.unk_token_id


def test_transformers_loads_the_exported_shipped_model_with_our_logits(tmp_path):
    import quantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = SmolLM2DeepSeek.from_pretrained(FINAL).eval()
    quantize.export(FINAL, str(tmp_path / "hf"), dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(FINAL)
    ids = torch.tensor([tokenizer("The heart is a muscle that pumps blood through the body. It has four")
                        ["input_ids"]])
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    loss = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:])
    assert loss.item() < 4.0  # a healed language model, not the converted one (~4.3 at first) nor noise


def test_training_record_ships_beside_the_model():
    from config import TrainConfig, dataclass_from_dict, read_yaml

    cfg = dataclass_from_dict(TrainConfig, read_yaml(RUN_CONFIG)["train"], "train")
    out = os.path.join(ROOT, "checkpoints")
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert rows[-1]["step"] == cfg.steps + cfg.extra_steps and rows[-1]["max_vio"]
    evaluated = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    assert len(evaluated) >= 5 and evaluated[-1] < evaluated[0] - 0.3  # it healed, and the record shows it
    samples = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert max(s["step"] for s in samples) == cfg.steps + cfg.extra_steps
    assert os.path.getsize(os.path.join(out, "training_plot.png")) > 10_000


def test_recorded_evaluation_meets_the_bars():
    """The measured report card of the shipped model (scripts/evaluate_model.py): val within the bar, loss no higher
    late in a 1024-token window than early, fluent chat replies, and packing cost at most 0.03 nats."""
    row = shipped_row()
    summary = json.load(open(os.path.join(FINAL, "training_summary.json")))
    assert row["val_first_256"] <= 2.85
    buckets = row["long_context"]["buckets"]
    assert buckets["512-1024"] <= buckets["0-256"]
    assert row["mean_distinct_2"] >= 0.6
    assert row["run_val"] - summary["val_loss"] <= 0.03  # the packed weights against the fp32 run's last val


@needs_corpus
def test_shipped_model_reproduces_its_recorded_validation_loss(tmp_path, monkeypatch):
    """The weights are the ones measured: config_heal.yaml's validation batches over val.jsonl give the run_val
    that results/heal/evaluation.json records for the packed checkpoint. A different or damaged checkpoint, or one
    evaluated differently, would not."""
    import data
    import train
    from config import TrainConfig, dataclass_from_dict, read_yaml

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # tokenize afresh, never a cached file
    cfg = dataclass_from_dict(TrainConfig, read_yaml(RUN_CONFIG)["train"], "train")
    model = SmolLM2DeepSeek.from_pretrained(FINAL)
    tokenizer = data.load_tokenizer(FINAL)
    tokens = data.tokenize_files([os.path.join(CORPUS_DIR, "val.jsonl")], tokenizer)
    with torch.no_grad():
        loss = train.evaluate(model, data.validation_batches(tokens, cfg), torch.device("cpu"), None)
    assert loss == pytest.approx(shipped_row()["run_val"], abs=2e-3)
