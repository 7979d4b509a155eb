"""data.py: documents -> token arrays (the bounded token cache) -> batches. Packed batches resume on exactly the
next batch and split the windows between ranks; validation is the same windows every time; without --val-data every
100th document is held out; the hub stream resumes exactly (a local iterable dataset stands in, no network)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import data
from config import TrainConfig
from conftest import TOKENIZER_DIR as TOKENIZER, needs_corpus, read_jsonl


def test_packed_batches_resume_exactly_and_split_windows_between_ranks():
    tokens = np.arange(1000, dtype=np.uint16)
    stream = data.PackedBatches(tokens, batch_size=3, seq_len=16, seed=7)
    seen = [stream.next() for _ in range(stream.per_epoch + 2)]  # into the second epoch
    x, y = seen[0]
    assert x.shape == (3, 16) and x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])
    starts = [int(x[i, 0]) for x, _ in seen[:stream.per_epoch] for i in range(3)]
    assert len(set(starts)) == len(starts) and all(s % 16 == 0 for s in starts)  # one epoch: each window once
    resumed = data.PackedBatches(tokens, batch_size=3, seq_len=16, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    assert resumed.position == len(seen)
    resumed.load_state_dict({"position": 5})
    for x, y in seen[5:]:
        rx, ry = resumed.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    ranks = [data.PackedBatches(tokens, batch_size=3, seq_len=16, seed=7, rank=r, world=2) for r in range(2)]
    firsts = [set(b.next()[0][:, 0].tolist()) for b in ranks]
    assert len(firsts[0]) == 3 and not firsts[0] & firsts[1]  # the ranks of one step never share a window
    with pytest.raises(ValueError, match="too few for one batch"):
        data.PackedBatches(tokens[:40], batch_size=3, seq_len=16, seed=7)


def test_validation_batches_are_the_first_consecutive_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    cfg = TrainConfig(batch_size=2, seq_len=16, eval_batches=3)
    val = data.validation_batches(tokens, cfg)
    assert len(val) == 3
    assert [int(x[i, 0]) for x, _ in val for i in range(2)] == [0, 16, 32, 48, 64, 80]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, data.validation_batches(tokens, cfg)))
    assert len(data.validation_batches(tokens[:70], cfg)) == 2  # as many as the data holds


def test_text_files_split_into_documents_at_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first document\nstill the first\n\n\n\nsecond\n\n  \n")
    assert list(data.read_documents(str(path))) == ["first document\nstill the first", "second"]


def test_every_hundredth_document_is_held_out_without_val_data(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} ends here."}) + "\n" for i in range(250)))
    args = argparse.Namespace(data=[str(path)], val_data=None)
    cfg = TrainConfig(batch_size=1, seq_len=8, eval_batches=100)
    batches, val = data.build_data(args, cfg, tokenizer, rank=0, world=1)
    train_text = tokenizer.decode(np.asarray(batches.tokens).tolist())
    val_text = tokenizer.decode(torch.cat([x[0] for x, _ in val]).tolist())
    assert "document 1 ends" in train_text and "document 249 ends" in train_text
    assert not any(f"document {i} ends" in train_text for i in (0, 100, 200))
    assert all(f"document {i} ends" in val_text for i in (0, 100)) and "document 1 ends" not in val_text
    assert np.asarray(batches.tokens).dtype == np.uint16 and batches.tokens[-1] == tokenizer.eos_token_id


@needs_corpus
def test_streamed_hub_batches_resume_exactly(train_data):
    """The hub path (no network here): the same packing over a local iterable dataset, resumed from its state."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    docs = read_jsonl(train_data / "train.jsonl")[:20]
    stream = Dataset.from_list(docs).to_iterable_dataset()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    first = data.HubBatches(stream, tok, batch_size=2, seq_len=32, skip_docs=1)
    seen = [first.next() for _ in range(3)]
    state = first.state_dict()
    expected = [first.next() for _ in range(2)]
    again = data.HubBatches(stream, tok, batch_size=2, seq_len=32, skip_docs=0)
    again.load_state_dict(state)
    for (x, y), (ex, ey) in zip([again.next() for _ in range(2)], expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert torch.equal(seen[0][0][0, 1:], seen[0][1][0, :-1])  # targets are the inputs shifted by one
    ids = tok(docs[1]["text"], add_special_tokens=False)["input_ids"]
    assert seen[0][0][0, :10].tolist() == ids[:10]  # skip_docs=1 skipped exactly the first document


# -- the token cache -----------------------------------------------------------------------------------------------


@needs_corpus
def test_token_cache_keeps_the_most_recently_used_files(train_data, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "smollm2-deepseek"
    cache.mkdir()
    for i in range(5):  # tokens-0 is the most recently used
        path = cache / f"tokens-{i}.npy"
        np.save(path, np.zeros(10, dtype=np.uint16))
        os.utime(path, (1e9 - i * 100, 1e9 - i * 100))
    np.save(cache / "tokens-x.123.tmp.npy", np.zeros(1))  # left by a kill long ago
    os.utime(cache / "tokens-x.123.tmp.npy", (1e9, 1e9))
    monkeypatch.setattr(data, "TOKEN_CACHE_MAX_FILES", 3)
    tokens = data.tokenize_files([str(train_data / "val.jsonl")], tokenizer)
    assert len(tokens) > 100
    names = sorted(os.listdir(cache))
    assert len(names) == 3 and "tokens-0.npy" in names and "tokens-1.npy" in names, names
    monkeypatch.setattr(data, "TOKEN_CACHE_MAX_BYTES", 1)  # a size cap below one file keeps only the new one
    data.tokenize_files([str(train_data / "val.jsonl"), str(train_data / "val.jsonl")], tokenizer)
    assert len(os.listdir(cache)) == 1
