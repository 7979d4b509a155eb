"""Shared test fixtures and helpers: paths, the tiny configs, a tiny published checkpoint, free ports, JSONL.

Tests read the offline tokenizer and corpus from ../shared (beside the repo on our machines); what needs them is
skipped when they are absent. Nothing here touches the network.
"""
import json
import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TOKENIZER_DIR = os.path.join(SHARED, "tokenizer")
CORPUS_DIR = os.path.join(SHARED, "corpus")
HAVE_TOKENIZER = os.path.isfile(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
HAVE_CORPUS = os.path.isfile(os.path.join(CORPUS_DIR, "train.jsonl"))
needs_tokenizer = pytest.mark.skipif(not HAVE_TOKENIZER, reason=f"needs the SmolLM2 tokenizer at {TOKENIZER_DIR}")
needs_corpus = pytest.mark.skipif(not (HAVE_TOKENIZER and HAVE_CORPUS),
                                  reason="needs ../shared/tokenizer and ../shared/corpus beside the repo")

# SmolLM2-135M's GQA caches K and V of 3 kv heads x 64 dims per token per layer: what MLA's latent cache beats
SMOLLM2_GQA_VALUES = 2 * 3 * 64

# A tiny model for parity and unit tests (a small vocabulary: no tokenizer needed)
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=3, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
            max_position_embeddings=64, rms_norm_eps=1e-5, routed_scaling_factor=1.0, n_group=1, topk_group=1,
            norm_topk_prob=True)

# A tiny model with the real 49152-token vocabulary, for the app (it tokenizes with the SmolLM2 tokenizer)
APP_TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=4, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, max_position_embeddings=128, n_routed_experts=8, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1)
APP_SUMMARY = {"step": 1234, "tokens_seen": 40_432_000, "train_loss": 3.4567, "val_loss": 3.5678}


def tiny_config(**overrides):
    from config import ModelConfig

    return ModelConfig.from_dict({**TINY, **overrides})


def spread_model(**overrides):
    """A seeded tiny model in eval mode with weights wider than the init (std 0.2), so that a wrong decoding path
    shows in the logits and the greedy tokens."""
    import torch

    from model import SmolLM2DeepSeek

    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_checkpoint(root, chat_template: bool = False, **overrides) -> str:
    """<root>/checkpoints/final as train.py publishes it (weights, tokenizer, summary), metrics and plot beside.
    A base model's tokenizer carries no chat template (as the shipped 13M model's); chat_template=True keeps
    SmolLM2's, as a chat model's checkpoint would."""
    import torch
    import transformers
    from PIL import Image

    from config import ModelConfig
    from model import SmolLM2DeepSeek

    final = os.path.join(str(root), "checkpoints", "final")
    torch.manual_seed(0)
    SmolLM2DeepSeek(ModelConfig.from_dict({**APP_TINY, **overrides})).save_pretrained(final)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(final)
    with open(os.path.join(final, "training_summary.json"), "w") as f:
        json.dump(APP_SUMMARY, f)
    with open(os.path.join(final, "..", "metrics.jsonl"), "w") as f:
        for step, val in [(1000, 3.9), (1234, 3.5678)]:
            f.write(json.dumps({"step": step, "loss": 3.5, "val_loss": val, "max_vio": [0.25, 0.75],
                                "tokens_seen": step * 100}) + "\n")
        f.write('{"step": 12')  # a line cut by a kill must be ignored
    Image.new("RGB", (330, 210), "lightsteelblue").save(os.path.join(final, "..", "training_plot.png"))
    return final


@pytest.fixture(scope="session")
def tokenizer():
    if not HAVE_TOKENIZER:
        pytest.skip(f"needs the SmolLM2 tokenizer at {TOKENIZER_DIR}")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


# -- the trainer's tests (test_train.py, test_faults.py): a tiny run config, ~60 corpus documents, the command line
TRAIN_TINY_YAML = """
model:
  vocab_size: 49152
  hidden_size: 32
  num_hidden_layers: 2
  num_attention_heads: 2
  kv_lora_rank: 16
  qk_nope_head_dim: 8
  qk_rope_head_dim: 4
  v_head_dim: 8
  intermediate_size: 64
  moe_intermediate_size: 16
  n_routed_experts: 4
  num_experts_per_tok: 2
  max_position_embeddings: 128
train:
  steps: 8
  extra_steps: 2
  batch_size: 2
  grad_accum_steps: 2
  seq_len: 32
  warmup_steps: 2
  checkpoint_every: 3
  eval_every: 3
  eval_batches: 2
  log_every: 1
  keep_last: 2
  sample_tokens: 4
"""


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """~60 training documents and 3 validation documents from the offline corpus; the tiny run config."""
    d = tmp_path_factory.mktemp("train_data")
    with open(os.path.join(CORPUS_DIR, "train.jsonl")) as src, open(d / "train.jsonl", "w") as dst:
        for _, line in zip(range(60), src):
            doc = json.loads(line)
            dst.write(json.dumps({"text": doc["text"][:3000]}) + "\n")
    with open(os.path.join(CORPUS_DIR, "val.jsonl")) as src, open(d / "val.jsonl", "w") as dst:
        for _, line in zip(range(3), src):
            dst.write(line)
    (d / "tiny.yaml").write_text(TRAIN_TINY_YAML)
    return d


def train_cmd(data, out, *extra) -> list[str]:
    """python train.py on the tiny config and data (no samples); extra arguments override."""
    import sys

    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", str(data / "tiny.yaml"),
            "--data", str(data / "train.jsonl"), "--val-data", str(data / "val.jsonl"),
            "--tokenizer", TOKENIZER_DIR, "--out", str(out), "--no-samples", *extra]


def train_env(data) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(data / "cache"), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# -- a run that skipped the browser tests says so loudly (a quiet "2 skipped" let a new user believe the page had
# been tested in a browser)
BROWSER_TESTS = "test_browser.py"


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if BROWSER_TESTS in str(getattr(r, "nodeid", ""))]
    if not skipped:
        return
    reasons = []
    for r in skipped:
        reason = r.longrepr[2] if isinstance(r.longrepr, tuple) and len(r.longrepr) == 3 else str(r.longrepr)
        reasons.append(f"{r.nodeid}: {reason.removeprefix('Skipped: ')}")
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", "BROWSER TESTS DID NOT RUN", red=True, bold=True)
    for line in dict.fromkeys(reasons):
        write(f"  {line}", red=True)
    write("  The page was NOT tested in a browser. Install Debian's chromium (`sudo apt-get install chromium`), or "
          "point CHROMIUM at a Chromium binary (e.g. after `python3 -m playwright install chromium`), and rerun.",
          red=True, bold=True)
