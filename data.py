"""Training data: documents -> token arrays (cached) -> batches. The one place a new data source plugs in.

    tokenizer = load_tokenizer("../shared/tokenizer")
    tokens = tokenize_files(["../shared/corpus/train.jsonl"], tokenizer)   # uint16, each document + eos
    batches = PackedBatches(tokens, batch_size=4, seq_len=256, seed=1337)  # random windows, exact resume
    x, y = batches.next()                                                  # [B, T] inputs, targets shifted by one
    batches, val = build_data(args, cfg, tokenizer, rank, world)            # what train.py calls

A batch source has `next() -> (inputs, targets)` and `state_dict()` / `load_state_dict()` (its position, saved in
every checkpoint so that a resumed run continues on exactly the next batch). `build_data` picks the sources from
the command line: local files (`PackedBatches`, with every 100th document held out unless --val-data is given) or
the hub stream (`HubBatches`). A new source (another file format, a mixture) is a class with those three methods,
chosen in `build_data`.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time

import numpy as np
import torch

from config import ConfigError, TrainConfig


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:  # offline, a typo, or a missing directory: say which and what to do
        raise RuntimeError(f"cannot load tokenizer {name_or_path!r} ({type(err).__name__}: {str(err)[:200]}); "
                           "offline, pass --tokenizer DIR with a local copy (e.g. ../shared/tokenizer)") from None


def describe_bad_utf8(err: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at byte offset {err.start})"


def read_documents(path: str):
    """The documents of a .jsonl file (one JSON object with a string 'text' per line) or a .txt file (documents
    separated by blank lines), UTF-8. Anything else is an error naming the file and line."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{n}: {describe_bad_utf8(err)} (offset within the line)") from None
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not valid JSON ({err.msg}, column {err.colno})") from None
                if not isinstance(doc, dict) or "text" not in doc:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field")
                if not isinstance(doc["text"], str):
                    raise ValueError(f"{path}:{n}: 'text' must be a string, got {type(doc['text']).__name__} "
                                     f"{str(doc['text'])[:40]}")
                yield doc["text"]
    else:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: {describe_bad_utf8(err)}") from None
        yield from (doc for doc in text.split("\n\n") if doc.strip())


def tokenize_files(paths: list[str], tokenizer, keep=lambda i: True) -> np.ndarray:
    """All documents of `paths` (those whose index passes `keep`), each followed by eos, as one uint16 array.
    Cached under ~/.cache/smollm2-deepseek keyed by the files and the tokenizer, so reruns start at once."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
    if any(path.endswith(".npy") for path in paths):
        if len(paths) > 1:
            raise ValueError(f"a pre-tokenized .npy must be the only data file, got {' '.join(paths)}")
        return load_token_array(paths[0])
    key = hashlib.sha256(json.dumps([[os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)] for p in paths]
                                    + [tokenizer.name_or_path, len(tokenizer), keep.__doc__]).encode()).hexdigest()
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "smollm2-deepseek")
    cache = os.path.join(cache_dir, f"tokens-{key[:16]}.npy")
    if os.path.isfile(cache):
        with contextlib.suppress(OSError):
            os.utime(cache)  # the cache keeps the most recently used files
        return np.load(cache, mmap_mode="r")
    if len(tokenizer) > 65535:
        raise ValueError("uint16 token storage needs a vocabulary of at most 65535 tokens")
    docs = [doc for path in paths for doc in read_documents(path)]
    docs = [doc for i, doc in enumerate(docs) if keep(i)]
    if not docs:
        raise ValueError(f"no documents in {paths}")
    pieces = []
    for start in range(0, len(docs), 256):
        # verbose=False: documents longer than the tokenizer's model_max_length are fine (they are packed and cut
        # into seq_len windows), so transformers' "will result in indexing errors" warning would only mislead
        for ids in tokenizer(docs[start:start + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(np.asarray(ids + [tokenizer.eos_token_id], dtype=np.uint16))
    tokens = np.concatenate(pieces)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp.npy"
    np.save(tmp, tokens)
    os.replace(tmp, cache)
    prune_token_cache(cache_dir, keep=cache)
    return tokens


def load_token_array(path: str) -> np.ndarray:
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable .npy token array ({err})") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise ValueError(f"{path}: expected a 1-D array of token ids (uint16), got {tokens.dtype} of shape "
                         f"{tokens.shape}")
    return tokens


# The token cache holds at most this many files and bytes; the least recently used go first.
TOKEN_CACHE_MAX_FILES = 8
TOKEN_CACHE_MAX_BYTES = 4 << 30


def prune_token_cache(cache_dir: str, keep: str) -> None:
    """Bound the token cache: delete the least recently used tokens-*.npy beyond TOKEN_CACHE_MAX_FILES files or
    TOKEN_CACHE_MAX_BYTES bytes (never `keep`, the file just written), and temp files left by a kill (> 1 h old)."""
    now = time.time()
    for tmp in glob.glob(os.path.join(cache_dir, "tokens-*.tmp.npy")):
        with contextlib.suppress(OSError):
            if now - os.path.getmtime(tmp) > 3600:
                os.remove(tmp)
    files = []
    for path in glob.glob(os.path.join(cache_dir, "tokens-*.npy")):
        if path.endswith(".tmp.npy"):
            continue
        with contextlib.suppress(OSError):
            files.append((os.path.getmtime(path), os.path.getsize(path), path))
    files.sort(reverse=True)  # newest first
    count, size = 0, 0
    for _, nbytes, path in files:
        count, size = count + 1, size + nbytes
        if path != keep and (count > TOKEN_CACHE_MAX_FILES or size > TOKEN_CACHE_MAX_BYTES):
            with contextlib.suppress(OSError):  # a file mapped by a running trainer stays readable after unlink
                os.remove(path)


class PackedBatches:
    """Random-access training batches over a flat token array: windows of seq_len + 1 tokens, shuffled per epoch by
    the seed. The data position is one integer (micro-batches consumed), so resuming is exact."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1):
        self.tokens, self.B, self.T, self.seed, self.rank, self.world = tokens, batch_size, seq_len, seed, rank, world
        self.num_windows = (len(tokens) - 1) // seq_len
        self.per_epoch = self.num_windows // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"the data holds {len(tokens)} tokens: too few for one batch of "
                             f"{batch_size * world} x {seq_len + 1} tokens")
        self.position = 0
        self._epoch, self._order = -1, None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(self.position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(self.seed + epoch))
        first = (index * self.world + self.rank) * self.B
        starts = self._order[first:first + self.B].numpy() * self.T
        rows = np.stack([self.tokens[s:s + self.T + 1] for s in starts]).astype(np.int64)
        self.position += 1
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class HubBatches:
    """Sequences packed from the streamed hub dataset, in stream order. Position: documents consumed plus the
    tokens left over from the last one, so a resumed run skips exactly what was seen."""

    def __init__(self, dataset, tokenizer, batch_size: int, seq_len: int, skip_docs: int, rank=0, world=1):
        self.dataset, self.tokenizer, self.B, self.T = dataset, tokenizer, batch_size, seq_len
        self.rank, self.world = rank, world
        self.docs, self.buffer, self._it = skip_docs, [], None

    def next(self):
        need = self.B * self.world * (self.T + 1)
        if self._it is None:
            self._it = iter(self.dataset.skip(self.docs))
        while len(self.buffer) < need:
            doc = next(self._it)
            self.docs += 1
            self.buffer += self.tokenizer(doc["text"], add_special_tokens=False, verbose=False)["input_ids"]
            self.buffer.append(self.tokenizer.eos_token_id)
        rows = torch.tensor(self.buffer[:need]).view(self.world, self.B, self.T + 1)[self.rank]
        self.buffer = self.buffer[need:]
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"docs": self.docs, "buffer": torch.tensor(self.buffer, dtype=torch.long)}

    def load_state_dict(self, state):
        self.docs, self.buffer, self._it = int(state["docs"]), state["buffer"].tolist(), None


def validation_batches(tokens: np.ndarray, cfg: TrainConfig) -> list:
    """The first cfg.eval_batches batches of consecutive seq_len windows: the same windows, in order, every time."""
    stream = PackedBatches(tokens, cfg.batch_size, cfg.seq_len, seed=0)
    stream._order = torch.arange(stream.num_windows)
    stream._epoch = 0
    return [stream.next() for _ in range(min(cfg.eval_batches, stream.per_epoch))]


def build_data(args, cfg: TrainConfig, tokenizer, rank: int, world: int):
    """-> (training batches, validation batches [list of (x, y)])."""
    if args.data:
        repeat = getattr(args, "data_repeat", None)
        if repeat and (len(repeat) != len(args.data) or min(repeat) < 1 or not args.val_data):
            raise ConfigError(f"--data-repeat takes one count >= 1 per --data file ({len(args.data)} files) and needs "
                              f"--val-data, got {' '.join(map(str, repeat))}")
        if repeat:  # each file tokenized (and cached) alone, then repeated: a small file weighs in, no copy on disk
            train_tokens = np.concatenate([tokenize_files([path], tokenizer)
                                           for path, n in zip(args.data, repeat) for _ in range(n)])
            val_tokens = tokenize_files(args.val_data, tokenizer)
        elif args.val_data:
            train_tokens = tokenize_files(args.data, tokenizer)
            val_tokens = tokenize_files(args.val_data, tokenizer)
        else:
            def train_docs(i):
                """all but every 100th document"""
                return i % 100 != 0

            def val_docs(i):
                """every 100th document"""
                return i % 100 == 0

            train_tokens = tokenize_files(args.data, tokenizer, keep=train_docs)
            val_tokens = tokenize_files(args.data, tokenizer, keep=val_docs)
        batches = PackedBatches(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
        return batches, validation_batches(val_tokens, cfg)
    try:
        from datasets import load_dataset

        stream = load_dataset(cfg.dataset, cfg.dataset_config, split="train", streaming=True)
        val_stream = HubBatches(stream.take(cfg.hub_val_docs), tokenizer, cfg.batch_size, cfg.seq_len, 0)
        val = []
        with contextlib.suppress(StopIteration):
            for _ in range(cfg.eval_batches):
                val.append(val_stream.next())
    except Exception as err:
        raise RuntimeError(f"cannot stream {cfg.dataset}/{cfg.dataset_config} from the hub "
                           f"({type(err).__name__}: {str(err)[:200]}); offline, pass --data FILE "
                           "(and --tokenizer DIR)") from None
    return HubBatches(stream, tokenizer, cfg.batch_size, cfg.seq_len, cfg.hub_val_docs, rank, world), val
