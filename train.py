"""Train SmolLM2-DeepSeek: 5000 steps, then 50 more from the step-5000 checkpoint (the design card's two phases).

    python train.py                                         # full model, cosmopedia-v2 streamed from the hub
    python train.py --config config_cpu.yaml --data ../shared/corpus/train.jsonl \
        --val-data ../shared/corpus/val.jsonl --tokenizer ../shared/tokenizer \
        --publish checkpoints                               # the shipped CPU model, offline, then shipped
    python train.py --checkpoint_path runs/config_smollm2_135/step_5000  # phase 2 alone, from step 5000
    torchrun --nproc_per_node 2 train.py ...                # DDP; expert loads are summed over ranks

A run lives in --out (default runs/<config name>); rerunning the same command resumes it. The shipped model
(checkpoints/) is replaced only by --publish. Exit codes: 0 done, 2 a bad argument, config, data file or
checkpoint (one line naming it), 3 the run diverged (nothing from it saved or published), 130 interrupted.

Reads top to bottom: configuration, data, model and optimiser, checkpoints, evaluation and metrics, then
`train_step` (one optimizer step; the benchmarks run it too) and the run itself, in four phases: setup (arguments,
configs, device, tokenizer, data) -> resume (or a fresh start) -> the loop (step, logging, evaluation, samples,
checkpoints) -> finish (bias check across ranks, the final model where app.py looks: <out>/final).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError, ModelConfig, dataclass_from_dict, read_yaml
from loss import SoftTargets
from model import SmolLM2DeepSeek, max_violation

DEFAULT_PROMPTS = ["Once upon a time", "The main causes of inflation are", "Photosynthesis is the process",
                   "In mathematics, a function"]


@dataclass
class TrainConfig:
    steps: int = 5000  # phase 1
    extra_steps: int = 50  # phase 2, started from the phase-1 checkpoint
    batch_size: int = 8  # sequences per micro-batch (per rank)
    grad_accum_steps: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, linear decay over the last decay_fraction)
    decay_fraction: float = 0.2
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    balance_bias: bool = True  # the auxiliary-loss-free bias update after every optimizer step
    checkpoint_every: int = 500
    eval_every: int = 500
    eval_batches: int = 8
    keep_last: int = 3
    sample_tokens: int = 48
    sample_prompts: list = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    log_every: int = 10
    max_skipped_steps: int = 10  # this many skipped steps in a row (non-finite loss or gradient) stop the run
    distill_weight: float = 1.0  # with --distill-from: token loss = (1 - w) CE + w KL(teacher || model)
    seed: int = 1337
    tokenizer: str = "HuggingFaceTB/cosmo2-tokenizer"
    dataset: str = "HuggingFaceTB/smollm-corpus"
    dataset_config: str = "cosmopedia-v2"
    hub_val_docs: int = 200  # documents held out from the start of the hub stream for validation

    def __post_init__(self):
        for key in ["batch_size", "grad_accum_steps", "seq_len", "lr", "checkpoint_every", "eval_every",
                    "eval_batches", "keep_last", "log_every", "grad_clip", "hub_val_docs", "max_skipped_steps"]:
            if getattr(self, key) <= 0:
                raise ConfigError(f"key '{key}' must be > 0, got {getattr(self, key)!r}")
        for key in ["steps", "extra_steps", "warmup_steps", "weight_decay", "eps", "sample_tokens"]:
            if getattr(self, key) < 0:
                raise ConfigError(f"key '{key}' must be >= 0, got {getattr(self, key)!r}")
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f"key 'distill_weight' must be in [0, 1], got {self.distill_weight!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"key 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"key 'decay_fraction' must be in (0, 1], got {self.decay_fraction!r}")
        for key in ["beta1", "beta2"]:
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be in [0, 1), got {getattr(self, key)!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"key 'schedule' must be 'cosine' or 'wsd', got {self.schedule!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"key 'dtype' must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not all(isinstance(p, str) and p for p in self.sample_prompts):
            raise ConfigError("key 'sample_prompts' must be a list of non-empty strings")


# ----------------------------------------------------------------------------------------------------------------
# Arguments and configuration


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config_smollm2_135.yaml", help="YAML with model: and train: sections")
    p.add_argument("--data", nargs="+", help="local training files (.jsonl with a 'text' field, .txt, or a "
                   "pre-tokenized uint16 .npy); default: stream the hub dataset")
    p.add_argument("--data-repeat", nargs="+", type=int, metavar="N", help="with --data: how many times each "
                   "file's tokens go into the training stream (one count per file), to weight a small file such as "
                   "chat data against a large corpus; windows are still drawn at random from the whole stream")
    p.add_argument("--val-data", nargs="+", help="local validation files; default with --data: every 100th document")
    p.add_argument("--tokenizer", help="tokenizer directory or hub name (default: the config's)")
    p.add_argument("--out", help="the run directory: checkpoints, metrics.jsonl, samples and plot go here "
                   "(default: runs/<config name>)")
    p.add_argument("--publish", metavar="DIR", help="after a healthy finish, copy <out>/final with the metrics, "
                   "samples and plot to DIR (e.g. checkpoints, the shipped model app.py serves), replacing DIR's")
    p.add_argument("--steps", type=int, help="phase-1 steps (default 5000)")
    p.add_argument("--extra-steps", type=int, help="phase-2 steps after the phase-1 checkpoint (default 50)")
    p.add_argument("--resume", default="auto", help="auto (latest good checkpoint in --out), none, or a directory; "
                   "a fresh start moves --out's old history to <out>/previous-<time>/")
    p.add_argument("--init-from", metavar="DIR", help="start from these weights (a model directory, e.g. "
                   "convert_smollm2.py's output) with a fresh optimizer, schedule and data position; its config.json "
                   "replaces the YAML's model: section and its tokenizer is the default. A run with checkpoints in "
                   "--out resumes from them instead")
    p.add_argument("--distill-from", metavar="PATH", help="a teacher (a transformers model directory, a hub id, or "
                   "a .gguf file) with the same vocabulary: the loss mixes in KL(teacher || model) on every token's "
                   "next-token distribution, chunked like the cross-entropy (see --distill-weight)")
    p.add_argument("--distill-weight", type=float, help="w in (1 - w) CE + w KL with --distill-from (default: the "
                   "config's distill_weight, 1.0 = pure distillation)")
    p.add_argument("--checkpoint_path", "--checkpoint-path", dest="checkpoint_path",
                   help="start from this checkpoint (e.g. runs/config_smollm2_135/step_5000 to run phase 2 alone)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, dest="grad_accum_steps")
    p.add_argument("--lr", type=float)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--no-balance", action="store_true", help="turn the loss-free bias update off (for comparison)")
    p.add_argument("--no-samples", action="store_true", help="skip sample generation at checkpoints")
    p.add_argument("--no-compile", action="store_true", help="on CUDA, run the blocks eagerly instead of through "
                   "torch.compile (the default there; CPU always runs eagerly)")
    p.add_argument("--max-skipped-steps", type=int, help="stop the run after this many consecutive skipped "
                   "(non-finite) steps (default 10)")
    p.add_argument("--allow-config-change", action="store_true", help="resume even though the checkpoint was "
                   "trained with different settings that change the run (they are listed)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    return args


def load_configs(args) -> tuple[ModelConfig, TrainConfig]:
    data = read_yaml(args.config)
    if args.init_from:  # the starting weights bring their own shape (and tokenizer): the YAML's model: is not used
        model_cfg = init_model_config(args.init_from)
    else:
        model_cfg = ModelConfig.from_dict(data.get("model", {}), where=f"{args.config} [model]")
    train_cfg = dataclass_from_dict(TrainConfig, data.get("train", {}), where=f"{args.config} [train]")
    overrides = {k: getattr(args, k, None) for k in ["steps", "extra_steps", "seed", "batch_size", "grad_accum_steps",
                                                     "lr", "seq_len", "max_skipped_steps", "distill_weight"]}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.tokenizer:
        overrides["tokenizer"] = args.tokenizer
    elif args.init_from and os.path.isfile(os.path.join(args.init_from, "tokenizer.json")):
        overrides["tokenizer"] = args.init_from
    if args.no_balance:
        overrides["balance_bias"] = False
    try:
        train_cfg = dataclasses.replace(train_cfg, **overrides)
    except ConfigError as err:
        raise ConfigError(f"command line: {err}") from None
    if train_cfg.steps + train_cfg.extra_steps == 0:
        raise ConfigError("nothing to train: steps and extra_steps are both 0 (set --steps or --extra-steps, or "
                          f"steps: in {args.config})")
    if args.data_repeat and (not args.data or len(args.data_repeat) != len(args.data)
                             or min(args.data_repeat) < 1):
        raise ConfigError(f"--data-repeat takes one count >= 1 per --data file ({len(args.data or [])} files), got "
                          f"{' '.join(map(str, args.data_repeat))}")
    if train_cfg.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"key 'seq_len' ({train_cfg.seq_len}) exceeds the model's max_position_embeddings "
                          f"({model_cfg.max_position_embeddings})")
    return model_cfg, train_cfg


def init_model_config(directory: str) -> ModelConfig:
    """The model config of an --init-from checkpoint (its config.json), every problem named."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--init-from {directory}: no config.json there (expected a model directory written by "
                          "save_pretrained, convert_smollm2.py or transformers)")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON (truncated, corrupt or not UTF-8?): {err}") from None
    return ModelConfig.from_hf_dict(hf, where=path)


# ----------------------------------------------------------------------------------------------------------------
# Data: documents -> tokens joined with eos -> fixed-length sequences


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
        for ids in tokenizer(docs[start:start + 256], add_special_tokens=False)["input_ids"]:
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
            self.buffer += self.tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
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
        if args.val_data and args.data_repeat:
            # each file tokenized (and cached) alone, then repeated: a small file weighs in without a copy on disk
            train_tokens = np.concatenate([tokenize_files([path], tokenizer) for path, n in
                                           zip(args.data, args.data_repeat) for _ in range(n)])
            val_tokens = tokenize_files(args.val_data, tokenizer)
        elif args.val_data:
            train_tokens = tokenize_files(args.data, tokenizer)
            val_tokens = tokenize_files(args.val_data, tokenizer)
        else:
            if args.data_repeat:
                raise ConfigError("--data-repeat needs --val-data (without it every 100th document is held out)")

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


# ----------------------------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def load_teacher(path: str, vocab_size: int, device: torch.device):
    """The --distill-from model in eval mode, frozen: a transformers causal LM (directory or hub id) or a .gguf file
    (read by transformers; needs the `gguf` package). Its vocabulary must be ours, token for token."""
    from transformers import AutoModelForCausalLM

    try:
        if path.endswith(".gguf"):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file: {path}")
            folder, name = os.path.split(os.path.abspath(path))
            teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        else:
            teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as err:
        raise ConfigError(f"--distill-from {path}: cannot load the teacher ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    size = teacher.get_output_embeddings().weight.shape[0]
    if size != vocab_size:
        raise ConfigError(f"--distill-from {path}: the teacher's vocabulary has {size} tokens, the model's "
                          f"{vocab_size}: distillation needs the same vocabulary")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def distillation_loss(teacher, kl_weight: float):
    """A train_step loss_fn: the model's loss with the teacher's next-token distributions mixed in (loss.SoftTargets:
    the teacher's final hidden states and lm_head, so its [tokens, vocab] logits are formed chunk by chunk)."""

    def loss_fn(model, x, y):
        with torch.no_grad():
            hidden = teacher.base_model(input_ids=x).last_hidden_state
        soft = SoftTargets(hidden.reshape(-1, hidden.shape[-1]), teacher.get_output_embeddings().weight, kl_weight)
        return model(x, y, teacher=soft)[1]

    return loss_fn


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def gemm_peak_tflops(device: torch.device, dtype: torch.dtype | None = None, n: int | None = None) -> float:
    """The best GEMM throughput of this device right now, in the dtype the step computes in (bf16 under CUDA
    autocast, fp32 on CPU): the MFU denominator, measured rather than taken from a datasheet (the H100s lent to
    this project measured ~800 TFLOP/s bf16; the CPUs 27-180 GFLOP/s fp32)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = n or (8192 if device.type == "cuda" else 1024)  # big enough to reach the peak, quick at start-up
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def compile_blocks(model: SmolLM2DeepSeek) -> None:
    """Regional compilation: each block becomes one torch.compile graph (the same code for every block, so it is
    compiled once), while the chunked loss and the optimizer stay eager. On a GPU the eager step is launch-bound
    (~1.0 s of wall time for 0.4 s of kernels at batch 16 x 1024 on an H100); fused kernels close that gap. In
    place: state-dict keys, checkpoints and the HF format are unchanged."""
    for block in model.model.layers:
        block.compile()


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    """None = plain fp32. Autocast is for CUDA only: some CPUs have no fast bf16 (measured ~1.5 GFLOP/s bf16 vs
    ~40 fp32 on an AVX2 EPYC)."""
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, cfg.dtype)


def build_optimizer(model: SmolLM2DeepSeek, cfg: TrainConfig, device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (attention, experts, router) but not on norms or the embedding."""
    embedding = model.model.embed_tokens.weight
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and p is not embedding else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one pass over each tensor instead of ~10 foreach passes (5x faster on CPU: 15 vs 75 ms per step for
    # the 9.4M-entry embedding of config_cpu.yaml)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type in ("cpu", "cuda"))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (1-based). The schedule spans phase 1; phase 2 stays at the floor."""
    floor = cfg.lr * cfg.min_lr_ratio
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    if step > cfg.steps:
        return floor
    if cfg.schedule == "wsd":
        decay_start = cfg.steps - int(cfg.decay_fraction * cfg.steps)
        if step <= decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - floor) * (step - decay_start) / max(1, cfg.steps - decay_start)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: <out>/step_N/{config.json, model.safetensors, tokenizer files, training_state.pt}, written atomically


def step_dirs(out: str) -> list[tuple[int, str]]:
    found = []
    for path in glob.glob(os.path.join(out, "step_*")):
        name = os.path.basename(path)
        if name[5:].isdigit() and os.path.isdir(path):
            found.append((int(name[5:]), path))
    return sorted(found)


def write_atomic(path: str, text: str) -> None:
    """Write a file whole or not at all: a temp file beside it, then a rename (a kill leaves the old one)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def all_finite(model: torch.nn.Module) -> bool:
    """Every parameter and buffer (the balancing bias included) holds finite numbers."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def replace_dir(tmp: str, final: str) -> None:
    """Put a fully written directory in place by rename; an existing one is kept until the new one is there."""
    if os.path.isdir(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)


def save_checkpoint(out, step, model, tokenizer, optimizer, scaler, batches, totals, cfg: TrainConfig,
                    protect=(), identity=None) -> str:
    """<out>/step_N, written to a temp directory and renamed. The caller writes only a healthy model (all finite),
    so rotation by keep_last only ever drops good checkpoints for newer good ones."""
    final = os.path.join(out, f"step_{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "data": batches.state_dict(),
        "totals": totals,
        "rng": rng_state(),
        "train_config": dataclasses.asdict(cfg),
        "run": identity or {},  # what else a resumed run must share with this one (see run_identity)
    }
    torch.save(state, os.path.join(tmp, "training_state.pt"))
    replace_dir(tmp, final)
    # rotate among checkpoints up to this step; later ones (from a run that was resumed from earlier, possibly
    # damaged) are left alone until this run overwrites them, so they never push a good one out
    for old_step, path in [(s, p) for s, p in step_dirs(out) if s <= step][:-cfg.keep_last]:
        if old_step not in protect:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str, device) -> tuple[SmolLM2DeepSeek, dict]:
    """Model and training state of one checkpoint; any damage is an error naming the file."""
    state_path = os.path.join(path, "training_state.pt")
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"checkpoint {path} has no training_state.pt (partial write?)")
    model = SmolLM2DeepSeek.from_pretrained(path, device=device)
    if not all_finite(model):
        raise ValueError(f"checkpoint {path} holds non-finite weights (a diverged run)")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {state_path} (truncated or corrupt?): {type(err).__name__}: {err}") from None
    return model, state


def find_resume_checkpoint(out: str, device, log) -> tuple[str, SmolLM2DeepSeek, dict] | None:
    """The newest checkpoint in `out` that loads; damaged ones are reported by name and skipped (not deleted)."""
    for step, path in reversed(step_dirs(out)):
        try:
            model, state = load_checkpoint(path, device)
            return path, model, state
        except Exception as err:
            log(f"WARNING: checkpoint {path} is unusable ({err}); falling back to the previous one")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Evaluation, samples, metrics, plot


@torch.no_grad()
def evaluate(model, val_batches, device, amp_dtype) -> float:
    model.eval()
    losses = []
    for x, y in val_batches:
        with autocast(device, amp_dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train()
    return sum(losses) / max(1, len(losses))


def write_samples(model, tokenizer, cfg: TrainConfig, step: int, out: str, log) -> None:
    rows = []
    for i, prompt in enumerate(cfg.sample_prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed + i)
        new = [t.token_id for t in model.generate(ids, cfg.sample_tokens, temperature=0.8, top_k=50, generator=gen)]
        text = prompt + tokenizer.decode(new, skip_special_tokens=True)
        rows.append({"step": step, "prompt": prompt, "text": text})
        log(f"  sample @ {step}: {text!r}")
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def plot_metrics(out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in rows], label="train", lw=0.8)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_yscale("log"), ax.set_title("loss"), ax.legend()
    axes[0, 1].plot(steps, [r["lr"] for r in rows]), axes[0, 1].set_title("learning rate")
    vio = np.array([r["max_vio"] for r in rows if r.get("max_vio")])
    if len(vio):
        ax = axes[1, 0]
        ax.plot([r["step"] for r in rows if r.get("max_vio")], vio.mean(1), label="mean over layers", lw=0.8)
        ax.plot([r["step"] for r in rows if r.get("max_vio")], vio.max(1), label="worst layer", lw=0.8, alpha=0.6)
        ax.set_title("MaxVio (expert load imbalance)"), ax.legend()
    axes[1, 1].plot(steps, [r["tokens_seen"] / 1e6 for r in rows]), axes[1, 1].set_title("tokens seen (M)")
    for ax in axes.flat:
        ax.set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(out, "training_plot.png")
    fig.savefig(path + ".tmp", dpi=90, format="png")
    plt.close(fig)
    os.replace(path + ".tmp", path)


def read_metrics(out: str) -> list[dict]:
    return read_rows(os.path.join(out, "metrics.jsonl"))


def read_rows(path: str) -> list[dict]:
    """The rows of a JSONL file; a line cut by a kill is dropped."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
    return rows


def truncate_metrics(out: str, step: int) -> None:
    """On resume, forget the metrics and samples logged after the checkpoint (the resumed run logs them again).
    Each file is rewritten whole (temp file + rename), so a kill now loses nothing."""
    for name in ["metrics.jsonl", "samples.jsonl"]:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in read_rows(path) if r["step"] <= step))


# What a run leaves in its directory besides its checkpoints; a fresh start sets all of it aside.
HISTORY = ["metrics.jsonl", "samples.jsonl", "training_plot.png", "final"]


def prepare_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create the directory ({err.strerror})") from None


def clean_stale(out: str, log) -> None:
    """What a kill can leave behind: temp files and directories (*.tmp) are removed; a directory set aside while
    being replaced (X.old) is put back if X is missing, else removed."""
    for path in sorted(glob.glob(os.path.join(out, "*.tmp"))):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        log(f"removed {path}, left by an interrupted write")
    for path in sorted(glob.glob(os.path.join(out, "*.old"))):
        if not os.path.exists(path[:-4]):
            os.replace(path, path[:-4])
            log(f"restored {path[:-4]} from {path}, left by an interrupted replace")
        else:
            shutil.rmtree(path, ignore_errors=True)


def set_history_aside(out: str, log) -> None:
    """A fresh start in a directory with history: move the old metrics, samples, plot, checkpoints and final into
    <out>/previous-<time>/, so the new run's history is its own (and nothing is lost)."""
    names = [n for n in HISTORY if os.path.exists(os.path.join(out, n))]
    names += [os.path.basename(path) for _, path in step_dirs(out)]
    if not names:
        return
    aside = os.path.join(out, time.strftime("previous-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(aside):
        n += 1
        aside = os.path.join(out, time.strftime("previous-%Y%m%d-%H%M%S") + f"-{n}")
    os.makedirs(aside)
    for name in names:
        os.replace(os.path.join(out, name), os.path.join(aside, name))
    log(f"fresh start in {out}: the previous run's {', '.join(names)} moved to {aside}")


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step: the trainer's loop and every benchmark run this


@dataclass
class StepResult:
    """What one optimizer step leaves for the caller. Tensors, so a caller reads them on the host only when it logs."""

    micro_losses: torch.Tensor  # [grad_accum_steps]: each micro-batch's loss / grad_accum_steps (this rank's)
    grad_norm: torch.Tensor  # the total gradient norm before clipping
    loads: torch.Tensor  # [MoE layers, E]: tokens routed this step, summed over micro-batches and ranks
    skipped: torch.Tensor  # bool: a non-finite loss or gradient, so the update (and the bias update) was dropped

    @property
    def loss(self) -> float:
        """The step's loss: the micro-batch losses summed on the host in float64, as they were logged before."""
        return sum(self.micro_losses.tolist())


def model_loss(model, x, y) -> torch.Tensor:
    return model(x, y)[1]


def train_step(model, optimizer, next_batch, cfg: TrainConfig, *, amp_dtype=None, scaler=None, ddp=None,
               loss_fn=model_loss) -> StepResult:
    """One optimizer step over cfg.grad_accum_steps micro-batches from `next_batch()` -> (inputs, targets).

    Backward under autocast (and GradScaler for fp16), no_sync on all but the last micro-batch under DDP (`ddp`, the
    wrapped `model`), the expert loads summed over micro-batches (all-reduced over ranks), gradient clipping, then
    the optimizer step and the loss-free balancing bias update -- or, if any loss or the gradient is not finite,
    neither (the step is skipped). Expert loads are reset for the next step. `loss_fn(model, x, y)` lets the
    benchmarks run a transformers model through the same step; balancing applies to our model only.
    """
    device = next(model.parameters()).device
    forward = ddp if ddp is not None else model
    accum = cfg.grad_accum_steps
    micro_losses = []
    for micro in range(accum):
        x, y = next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        defer_sync = ddp is not None and micro < accum - 1  # gradients are all-reduced once, after the last
        with (ddp.no_sync() if defer_sync else contextlib.nullcontext()), autocast(device, amp_dtype):
            loss = loss_fn(forward, x, y) / accum
        (scaler.scale(loss) if scaler else loss).backward()
        micro_losses.append(loss.detach())
    micro_losses = torch.stack(micro_losses)
    finite = torch.isfinite(micro_losses).all()
    balancing = isinstance(model, SmolLM2DeepSeek)
    loads = model.expert_loads() if balancing else torch.zeros(0, 0)
    if ddp is not None:
        dist.all_reduce(loads)
        flag = finite.float().to(loads.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # one rank's NaN skips the step on every rank
        finite = flag.bool()
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    skipped = ~(finite & torch.isfinite(grad_norm))
    # The one host sync of a step: whether to apply the update. (A device-only path could hand the flag to a fused
    # optimizer as GradScaler does with found_inf, and zero the loads instead of skipping the bias update.)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.update()
    else:
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if balancing and cfg.balance_bias:
            model.update_bias(loads)  # once per optimizer step, from the whole global batch's loads
    if balancing:
        model.reset_expert_loads()
    return StepResult(micro_losses, grad_norm.detach(), loads, skipped)


# ----------------------------------------------------------------------------------------------------------------
# The run: setup -> resume (or a fresh start) -> the loop -> finish


@dataclass
class Run:
    """What setup decides once: the arguments, configs, device, ranks, tokenizer and data."""

    args: argparse.Namespace
    model_cfg: ModelConfig
    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    tokenizer: object
    batches: object  # PackedBatches or HubBatches
    val_batches: list
    identity: dict  # what a resumed run must share with the checkpoint besides its configs (see run_identity)
    loss_fn: object = None  # train_step's loss_fn: the model's own loss, or distillation_loss with --distill-from

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> str:
        return self.args.out

    @property
    def total_steps(self) -> int:
        return self.cfg.steps + self.cfg.extra_steps

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum_steps * self.world

    def log(self, msg: str) -> None:
        if self.master:
            tqdm_write(msg)


@dataclass
class Trainer:
    """The state that changes as the run goes: model, optimiser, scaler, step and totals."""

    model: SmolLM2DeepSeek
    ddp: object  # the DistributedDataParallel wrapper of `model`, or None on one rank
    optimizer: torch.optim.Optimizer
    scaler: object  # torch.amp.GradScaler for fp16, else None
    amp_dtype: object  # the autocast dtype, None for plain fp32
    step: int
    totals: dict


class TrainingDiverged(RuntimeError):
    """The model went non-finite: the run stopped without saving or publishing it (exit code 3)."""


def setup(args) -> Run:
    # distributed setup (torchrun sets these)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(args.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    model_cfg, cfg = load_configs(args)
    prepare_out(args.out)
    if args.publish and os.path.exists(args.publish) and not os.path.isdir(args.publish):
        raise ConfigError(f"--publish {args.publish}: is a file, not a directory")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # a fresh model's initial weights come from here
    tokenizer = load_tokenizer(cfg.tokenizer)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but vocab_size is {model_cfg.vocab_size}")
    batches, val_batches = build_data(args, cfg, tokenizer, rank, world)
    loss_fn = model_loss
    if args.distill_from:
        loss_fn = distillation_loss(load_teacher(args.distill_from, model_cfg.vocab_size, device), cfg.distill_weight)
    identity = run_identity(tokenizer, batches, world)
    if args.distill_from:  # a resumed distillation run must keep its teacher
        identity["teacher"] = args.distill_from
    run = Run(args, model_cfg, cfg, device, rank, world, tokenizer, batches, val_batches, identity, loss_fn)
    if run.master:
        clean_stale(run.out, run.log)
    if world > 1:
        dist.barrier()
    return run


def run_identity(tokenizer, batches, world: int) -> dict:
    """Settings outside the configs that change a run: the ranks, the training data's size, the tokenizer's vocab."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    return {"world_size": world,
            "train_tokens": len(batches.tokens) if isinstance(batches, PackedBatches) else None,
            "tokenizer_vocab": hashlib.sha256(vocab).hexdigest()[:16]}


# TrainConfig keys that may differ on resume: they change what is logged, evaluated when or kept, not the steps
# taken (extra_steps only adds steps at the end; the tokenizer is compared by its vocabulary, not its name).
RESUME_FREE_KEYS = {"extra_steps", "log_every", "eval_every", "checkpoint_every", "keep_last", "sample_tokens",
                    "sample_prompts", "max_skipped_steps", "gradient_checkpointing", "tokenizer"}


def config_changes(model: SmolLM2DeepSeek, state: dict, run: Run) -> list[str]:
    """The settings of this run that differ from the checkpoint's, as 'key: saved -> now', where they change the
    run. Checkpoints from before a setting was saved are not compared on it."""
    changes = []
    for f in dataclasses.fields(ModelConfig):
        saved, now = getattr(model.config, f.name), getattr(run.model_cfg, f.name)
        if saved != now:
            changes.append(f"model {f.name}: {saved!r} -> {now!r}")
    saved_train = state.get("train_config") or {}
    for key, now in dataclasses.asdict(run.cfg).items():
        if key not in RESUME_FREE_KEYS and key in saved_train and saved_train[key] != now:
            changes.append(f"{key}: {saved_train[key]!r} -> {now!r}")
    saved_run = state.get("run") or {}
    for key, now in run.identity.items():
        if key in saved_run and saved_run[key] != now:
            changes.append(f"{key}: {saved_run[key]!r} -> {now!r}")
    return changes


def resume_or_start(run: Run) -> Trainer:
    """The model, optimiser and position: from a checkpoint (--checkpoint_path, --resume DIR, or the newest good
    one in --out) with its optimizer, data position and RNG state, or fresh (the directory's old history is set
    aside). A checkpoint trained with settings that change the run is refused unless --allow-config-change."""
    args, cfg = run.args, run.cfg
    resume = None
    if args.checkpoint_path:
        resume = (args.checkpoint_path, *load_checkpoint(args.checkpoint_path, run.device))
    elif args.resume not in ("auto", "none"):
        resume = (args.resume, *load_checkpoint(args.resume, run.device))
    elif args.resume == "auto":
        resume = find_resume_checkpoint(run.out, run.device, run.log)
    if resume:
        path, model, state = resume
        changes = config_changes(model, state, run)
        if changes and not args.allow_config_change:
            raise ConfigError(f"checkpoint {path} was trained with other settings that change the run: "
                              f"{'; '.join(changes)}. Start a new run (another --out, or --resume none), or pass "
                              "--allow-config-change to continue with these changes")
        if changes:
            run.log(f"WARNING: continuing from {path} with changed settings (--allow-config-change): "
                    f"{'; '.join(changes)}")
        if model.config != run.model_cfg:
            model = adopt_model_config(model, run.model_cfg, path)
        model.train()
    else:
        if run.master:
            set_history_aside(run.out, run.log)
        if args.init_from:  # weights only (the routing bias included); everything else starts fresh
            model, state = SmolLM2DeepSeek.from_pretrained(args.init_from, device=run.device).train(), None
            run.log(f"starting from the weights in {args.init_from}")
        else:
            model, state = SmolLM2DeepSeek(run.model_cfg).to(run.device), None
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if run.device.type == "cuda" and not args.no_compile:
        compile_blocks(model)
    amp_dtype = autocast_dtype(cfg, run.device)
    optimizer = build_optimizer(model, cfg, run.device)
    scaler = torch.amp.GradScaler(run.device.type) if amp_dtype == torch.float16 else None
    step, totals = 0, {"tokens_seen": 0, "skipped_steps": 0, "train_seconds": 0.0}
    if state:
        if state["step"] > run.total_steps:
            raise ConfigError(f"checkpoint {path} is at step {state['step']}, past this run's last step "
                              f"{run.total_steps} (steps {cfg.steps} + extra_steps {cfg.extra_steps})")
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        run.batches.load_state_dict(state["data"])
        step, totals = state["step"], dict(state["totals"])
        restore_rng(state["rng"], run.device)
        if run.master:
            truncate_metrics(run.out, step)
        run.log(f"resumed from {path} at step {step}")
    ddp = None
    if run.world > 1:
        # the balancing bias and load counters are per-rank buffers kept equal by summing loads, not broadcast
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    return Trainer(model, ddp, optimizer, scaler, amp_dtype, step, totals)


def adopt_model_config(model: SmolLM2DeepSeek, config: ModelConfig, path: str) -> SmolLM2DeepSeek:
    """The checkpoint's weights in a model built from this run's (changed) config; the shapes must match."""
    new = SmolLM2DeepSeek(config).to(next(model.parameters()).device)
    try:
        new.load_state_dict(model.state_dict())
    except RuntimeError:
        raise ConfigError(f"checkpoint {path}: its weights do not fit this run's model config (a changed key "
                          "changes their shapes); only keys such as bias_update_speed can change on resume") from None
    return new


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])


def train(run: Run, t: Trainer) -> None:
    """Steps t.step + 1 .. total: each one optimizer step, then logging, evaluation, samples and checkpoints.
    A checkpoint is written after a step whose update was applied, with every weight finite: one due after a
    skipped step waits for the next good step. TrainingDiverged stops the run after cfg.max_skipped_steps skipped
    steps in a row, a non-finite validation loss, non-finite weights, or a last step that was skipped: nothing
    non-finite or stuck is ever saved or published."""
    cfg, model = run.cfg, t.model
    counts = model.count_parameters()
    # MFU: 6 FLOP per active parameter per token (forward + backward; the tied lm_head counted once, as the matmul
    # it is) against this device's GEMM peak in the step's dtype, probed here, times the ranks
    peak = gemm_peak_tflops(run.device, t.amp_dtype) * 1e12 * run.world if run.master else float("nan")
    flop_per_token = 6 * counts["active"]
    compiled = run.device.type == "cuda" and not run.args.no_compile
    run.log(f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active | device "
            f"{run.device}{'' if t.amp_dtype is None else f' autocast {t.amp_dtype}'}"
            f"{' compiled blocks' if compiled else ' eager'} | GEMM peak {peak / 1e12 / run.world:.2f} TFLOP/s per "
            f"rank | {run.world} rank(s) | {run.tokens_per_step} tokens/step | phase 1: steps 1-{cfg.steps}"
            + (f", phase 2: steps {cfg.steps + 1}-{run.total_steps}" if cfg.extra_steps else ""))
    protect = {cfg.steps}  # the phase-1 checkpoint is where phase 2 starts: never rotated away

    from tqdm import tqdm

    bar = tqdm(total=run.total_steps, initial=t.step, disable=not run.master, dynamic_ncols=True, file=sys.stderr)
    model.train()
    model.reset_expert_loads()
    skipped_in_a_row = 0
    checkpoint_due = None  # the step whose checkpoint is owed (it waits while steps are skipped)
    metrics_path = os.path.join(run.out, "metrics.jsonl")
    with (open(metrics_path, "a") if run.master else contextlib.nullcontext()) as metrics_file:
        t_last = time.perf_counter()
        while t.step < run.total_steps:
            t.step += 1
            step = t.step
            if step == cfg.steps + 1:
                run.log(f"phase 2: {cfg.extra_steps} more steps from the step-{cfg.steps} checkpoint")
            lr = lr_at(step, cfg)
            for group in t.optimizer.param_groups:
                group["lr"] = lr
            result = train_step(model, t.optimizer, run.batches.next, cfg, amp_dtype=t.amp_dtype, scaler=t.scaler,
                                ddp=t.ddp, loss_fn=run.loss_fn)
            diverged = None
            if result.skipped:
                # a NaN/inf loss or gradient: the update (and its loads) was dropped; count it and carry on, unless
                # it keeps happening. (fp16's GradScaler skips overflowing steps while it lowers its scale: with a
                # finite loss those are not counted as divergence.)
                t.totals["skipped_steps"] += 1
                if t.scaler is None or not torch.isfinite(result.micro_losses).all():
                    skipped_in_a_row += 1
                run.log(f"WARNING: step {step}: non-finite loss or gradient; update skipped "
                        f"({t.totals['skipped_steps']} so far, {skipped_in_a_row} in a row)")
                if skipped_in_a_row >= cfg.max_skipped_steps:
                    diverged = (f"{skipped_in_a_row} steps in a row skipped for a non-finite loss or gradient "
                                f"(max_skipped_steps {cfg.max_skipped_steps})")
            else:
                skipped_in_a_row = 0
            now = time.perf_counter()
            step_seconds = now - t_last
            t.totals["train_seconds"] += step_seconds
            t_last = now
            t.totals["tokens_seen"] += run.tokens_per_step
            bar.update(1)

            row = None
            if run.master and (step % cfg.log_every == 0 or step % cfg.eval_every == 0 or diverged
                               or step in (1, cfg.steps, run.total_steps)):
                loads = result.loads
                row = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": float(result.grad_norm),
                       "tokens_seen": t.totals["tokens_seen"], "skipped_steps": t.totals["skipped_steps"],
                       "tokens_per_s": run.tokens_per_step / max(step_seconds, 1e-9),
                       "mfu": run.tokens_per_step / max(step_seconds, 1e-9) * flop_per_token / peak,
                       "max_vio": max_violation(loads).tolist() if len(loads) else [],
                       "expert_load": loads.int().tolist()}
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                                mfu=f"{100 * row['mfu']:.1f}%")
            if step % cfg.eval_every == 0 or step in (cfg.steps, run.total_steps):
                val_loss = evaluate(model, run.val_batches, run.device, t.amp_dtype)
                if row is not None:
                    row["val_loss"] = val_loss
                max_vio = max_violation(result.loads).mean().item() if len(result.loads) else 0
                speed = f", {row['tokens_per_s']:.0f} tok/s, MFU {100 * row['mfu']:.1f}%" if row else ""
                run.log(f"step {step}: train loss {result.loss:.4f}, val loss {val_loss:.4f}, lr {lr:.2e}, "
                        f"MaxVio {max_vio:.3f}{speed}")
                if not math.isfinite(val_loss):
                    diverged = diverged or f"the validation loss is {val_loss}"
            if row is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if step % cfg.checkpoint_every == 0 or step in (cfg.steps, run.total_steps):
                checkpoint_due = checkpoint_due or step
            if checkpoint_due and result.skipped:
                if step == run.total_steps:
                    diverged = diverged or "the last step was skipped (a non-finite loss or gradient)"
                elif step == checkpoint_due:
                    run.log(f"WARNING: step {step} was skipped: its checkpoint waits for the next good step")
            if checkpoint_due and not result.skipped and not diverged and not all_finite(model):
                diverged = "the model holds non-finite weights"
            if diverged:
                bar.close()
                raise TrainingDiverged(divergence_message(run, step, diverged))
            if checkpoint_due and not result.skipped:
                if checkpoint_due == cfg.steps:
                    protect.add(step)  # the phase-1 checkpoint, wherever it landed
                checkpoint_due = None
                if run.master:
                    if not run.args.no_samples:
                        write_samples(model, run.tokenizer, cfg, step, run.out, run.log)
                    path = save_checkpoint(run.out, step, model, run.tokenizer, t.optimizer, t.scaler, run.batches,
                                           t.totals, cfg, protect, run.identity)
                    plot_metrics(run.out)
                    run.log(f"saved {path}")
                if run.world > 1:
                    dist.barrier()
                t_last = time.perf_counter()  # checkpoint and sample time is not training time
    bar.close()


def divergence_message(run: Run, step: int, reason: str) -> str:
    if run.master:
        plot_metrics(run.out)  # the curve up to here, to see where it went wrong
    good = [path for s, path in step_dirs(run.out) if s < step]
    where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written"
    return (f"training diverged at step {step}: {reason}. No checkpoint was written from it; {where}; "
            f"{os.path.join(run.out, 'final')} was not published. Lower --lr (resuming needs --allow-config-change) "
            "or look for bad data")


def finish(run: Run, t: Trainer) -> None:
    """Check the balancing bias agrees across ranks, then publish <out>/final (and --publish DIR)."""
    if run.world > 1:  # the bias must be identical on every rank: loads were summed, so every update was the same
        for moe in t.model.moe_layers:
            bias = moe.gate.e_score_correction_bias
            gathered = [torch.zeros_like(bias) for _ in range(run.world)]
            dist.all_gather(gathered, bias)
            spread = max((g - gathered[0]).abs().max().item() for g in gathered)
            if spread != 0:
                raise RuntimeError(f"balancing bias differs across ranks by {spread}")
        run.log(f"balancing bias identical on all {run.world} ranks")
    if not all_finite(t.model):  # checkpoints are only written healthy; this guards the publishing itself
        raise TrainingDiverged(f"the model at step {t.step} holds non-finite weights; nothing was published")
    if run.master:
        final = publish_final(run.out, run.total_steps)
        run.log(f"done: {t.step} steps, {t.totals['tokens_seen']} tokens, {t.totals['skipped_steps']} skipped, "
                f"{t.totals['train_seconds'] / 60:.1f} min training; final model in {final}")
        if run.args.publish:
            published = publish_run(run.out, run.args.publish)
            run.log(f"published {final} as {published}, with its metrics, samples and plot beside it")


def main(argv=None) -> None:
    args = parse_args(argv)
    run = setup(args)
    trainer = resume_or_start(run)
    train(run, trainer)
    finish(run, trainer)
    if run.world > 1:
        dist.destroy_process_group()


def publish_final(out: str, step: int) -> str:
    """Copy the last checkpoint's model (no optimizer state) to <out>/final, where app.py looks, atomically."""
    source = os.path.join(out, f"step_{step}")
    final = os.path.join(out, "final")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("training_state.pt"))
    rows = read_metrics(out)
    val = [r for r in rows if "val_loss" in r]
    # one batch's loss is noisy: the mean of the last 10 logged (a skipped step's NaN is left out)
    recent = [r for r in rows[-10:] if math.isfinite(r["loss"])]
    summary = {"step": step, "tokens_seen": rows[-1]["tokens_seen"] if rows else None,
               "train_loss": sum(r["loss"] for r in recent) / len(recent) if recent else None,
               "train_loss_steps": [recent[0]["step"], recent[-1]["step"]] if recent else None,
               "val_loss": val[-1]["val_loss"] if val else None}
    with open(os.path.join(tmp, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    replace_dir(tmp, final)
    return final


def publish_run(out: str, dest: str) -> str:
    """--publish DIR: <out>/final becomes DIR/final, and the run's metrics.jsonl, samples.jsonl and
    training_plot.png replace DIR's (a file the run lacks is removed from DIR, so all of DIR is one run's). Each
    piece is written beside its target and renamed into place."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ConfigError(f"--publish {dest}: is a file, not a directory")
    os.makedirs(dest, exist_ok=True)
    final = os.path.join(dest, "final")
    if os.path.realpath(final) == os.path.realpath(os.path.join(out, "final")):
        return final  # --publish names the run directory itself: already there
    shutil.rmtree(final + ".tmp", ignore_errors=True)
    shutil.copytree(os.path.join(out, "final"), final + ".tmp")
    replace_dir(final + ".tmp", final)
    for name in ["metrics.jsonl", "samples.jsonl", "training_plot.png"]:
        source, target = os.path.join(out, name), os.path.join(dest, name)
        if os.path.isfile(source):
            shutil.copyfile(source, target + ".tmp")
            os.replace(target + ".tmp", target)
        elif os.path.isfile(target):
            os.remove(target)
    return final


def tqdm_write(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def cli(argv=None) -> int:
    """main() with the exit codes of the command line: 0 done, 2 a bad argument, config, data file or checkpoint
    (one line naming it), 3 the run diverged, 130 interrupted."""
    try:
        main(argv)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ConfigError, OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
