"""The shipped model in checkpoints/final: it is the model its training record describes (it reproduces the recorded
validation loss), transformers loads it with our logits, the two-phase run is complete, small enough for git, and its
training record ships beside it."""
import json
import os

import pytest
import torch

from conftest import CORPUS_DIR, ROOT, needs_corpus, read_jsonl
from model import SmolLM2DeepSeek

FINAL = os.path.join(ROOT, "checkpoints", "final")


def test_shipped_checkpoint_is_complete_and_small():
    files = set(os.listdir(FINAL))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "training_summary.json"} <= files
    size = sum(os.path.getsize(os.path.join(FINAL, f)) for f in files)
    assert size < 100 * 2 ** 20
    summary = json.load(open(os.path.join(FINAL, "training_summary.json")))
    assert summary["step"] == 5050  # 5000 steps, then 50 more from the step-5000 checkpoint
    assert abs(summary["val_loss"] - summary["train_loss"]) < 0.3  # generalises, did not memorise


def test_transformers_loads_shipped_model_with_same_logits():
    transformers = pytest.importorskip("transformers")
    ours = SmolLM2DeepSeek.from_pretrained(FINAL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(FINAL, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(FINAL)
    ids = torch.tensor([tok("The main causes of inflation are rising costs and")["input_ids"]])
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    # and it learned something: the continuation is far likelier than uniform over 49152 tokens
    loss = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:])
    assert loss.item() < 7.0


def test_training_record_ships_beside_the_model():
    out = os.path.join(ROOT, "checkpoints")
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert rows[-1]["step"] == 5050 and rows[-1]["max_vio"]
    samples = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert sorted({s["step"] for s in samples}) == list(range(500, 5001, 500)) + [5050]
    assert os.path.getsize(os.path.join(out, "training_plot.png")) > 10_000


@needs_corpus
def test_shipped_model_reproduces_its_recorded_validation_loss(tmp_path, monkeypatch):
    """The weights are the ones the training record describes: the validation batches the run evaluated (its
    config's batch, length and eval_batches over val.jsonl) give the val_loss of training_summary.json. A different
    or damaged checkpoint, or one evaluated differently, would not."""
    import data
    import train
    from config import TrainConfig, dataclass_from_dict, read_yaml

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # tokenize afresh, never a cached file
    summary = json.load(open(os.path.join(FINAL, "training_summary.json")))
    cfg = dataclass_from_dict(TrainConfig, read_yaml(os.path.join(ROOT, "config_cpu.yaml"))["train"], "train")
    model = SmolLM2DeepSeek.from_pretrained(FINAL)
    tokenizer = data.load_tokenizer(FINAL)
    tokens = data.tokenize_files([os.path.join(CORPUS_DIR, "val.jsonl")], tokenizer)
    loss = train.evaluate(model, data.validation_batches(tokens, cfg), torch.device("cpu"), None)
    assert loss == pytest.approx(summary["val_loss"], abs=2e-3)
