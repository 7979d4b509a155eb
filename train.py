r"""Train SmolLM2-DeepSeek: 5000 steps, then 50 more from the step-5000 checkpoint (the design card's two phases).

    python train.py                                         # full model, cosmopedia-v2 streamed from the hub
    python train.py --config config_cpu.yaml --data ../shared/corpus/train.jsonl \
        --val-data ../shared/corpus/val.jsonl --tokenizer ../shared/tokenizer \
        --publish checkpoints                               # the shipped CPU model, offline, then shipped
    python train.py --checkpoint_path runs/config_smollm2_135/step_5000  # phase 2 alone, from step 5000
    torchrun --nproc_per_node 2 train.py ...                # DDP; expert loads are summed over ranks

A run lives in --out (default runs/<config name>); rerunning the same command resumes it. The shipped model
(checkpoints/) is replaced only by --publish. Exit codes: 0 done, 2 a bad argument, config, data file or
checkpoint (one line naming it), 3 the run diverged (nothing from it saved or published), 130 interrupted.

Reads top to bottom: flags and configuration -> setup (ranks, device, tokenizer, data; then the model, optimizer
and position, resumed or fresh) -> `train_step` (one optimizer step; the benchmarks run it too) -> the loop (schedule,
metrics, evaluation, samples, checkpoints) -> finish. Data is data.py's, the run directory checkpoint.py's.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import (all_finite, check_resume, clean_stale, divergence_message, find_resume_point, metrics_row,
                        plot_metrics, prepare_out, publish_final, publish_run, restore_training_state, run_identity,
                        save_checkpoint, set_history_aside, truncate_metrics, write_samples)
from config import ConfigError, ModelConfig, TrainConfig, dataclass_from_dict, init_model_config, read_yaml
from data import build_data, load_tokenizer
from loss import distillation_loss, load_teacher
from model import SmolLM2DeepSeek, max_violation

# ----------------------------------------------------------------------------------------------------------------
# Flags and configuration


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config_smollm2_135.yaml", help="YAML with model: and train: sections")
    p.add_argument("--data", nargs="+", help="local training files (.jsonl with a 'text' field, .txt, or a "
                   "pre-tokenized uint16 .npy); default: stream the hub dataset")
    p.add_argument("--data-repeat", nargs="+", type=int, metavar="N", help="with --val-data: times each --data "
                   "file's tokens go into the training stream, to weigh a small file (chat data) against a corpus")
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
    p.add_argument("--distill-from", metavar="PATH", help="a teacher with our vocabulary (transformers directory, "
                   "hub id or .gguf file): the loss mixes in KL(teacher || model) per token, chunked like the CE")
    p.add_argument("--distill-weight", type=float, help="w in (1 - w) CE + w KL (default: config's distill_weight)")
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
    if train_cfg.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"key 'seq_len' ({train_cfg.seq_len}) exceeds the model's max_position_embeddings "
                          f"({model_cfg.max_position_embeddings})")
    return model_cfg, train_cfg


# ----------------------------------------------------------------------------------------------------------------
# Setup: ranks, device, configs, tokenizer and data (a Run); then the model, optimizer and position (a Trainer)


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
    loss_fn: object = None  # train_step's loss_fn: the model's own, or loss.distillation_loss with --distill-from

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
            tqdm.write(msg, file=sys.stderr)  # above the progress bar


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
    identity, loss_fn = run_identity(tokenizer, batches, world), model_loss
    if args.distill_from:  # a resumed distillation run keeps its teacher
        identity["teacher"] = os.path.abspath(args.distill_from) if os.path.exists(args.distill_from) \
            else args.distill_from
        loss_fn = distillation_loss(load_teacher(args.distill_from, model_cfg.vocab_size, device), cfg.distill_weight)
    run = Run(args, model_cfg, cfg, device, rank, world, tokenizer, batches, val_batches, identity, loss_fn)
    if run.master:
        clean_stale(run.out, run.log)
    if world > 1:
        dist.barrier()
    return run


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


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    """None = plain fp32. Autocast is for CUDA only: some CPUs have no fast bf16 (measured ~1.5 GFLOP/s bf16 vs
    ~40 fp32 on an AVX2 EPYC)."""
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, cfg.dtype)


def compile_blocks(model: SmolLM2DeepSeek) -> None:
    """Regional compilation: each block becomes one torch.compile graph (the same code for every block, so it is
    compiled once), while the chunked loss and the optimizer stay eager. On a GPU the eager step is launch-bound
    (~1.0 s of wall time for 0.4 s of kernels at batch 16 x 1024 on an H100); fused kernels close that gap. In
    place: state-dict keys, checkpoints and the HF format are unchanged."""
    for block in model.model.layers:
        block.compile()


def build_optimizer(model: SmolLM2DeepSeek, cfg: TrainConfig, device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (attention, experts, router) but not on norms, the embedding or a KDA
    layer's decay rates (A_log [1, 1, H, 1] is a matrix only in shape; decaying it would pull every rate to 1)."""
    embedding = model.model.embed_tokens.weight
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and p is not embedding and not name.endswith(".A_log") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one pass over each tensor instead of ~10 foreach passes (5x faster on CPU: 15 vs 75 ms per step for
    # the 9.4M-entry embedding of config_cpu.yaml)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type in ("cpu", "cuda"))


def resume_or_start(run: Run) -> Trainer:
    """The model, optimiser and position: from a checkpoint (--checkpoint_path, --resume DIR, or the newest good
    one in --out) with its optimizer, data position and RNG state, or fresh (the directory's old history is set
    aside). A checkpoint trained with settings that change the run is refused unless --allow-config-change."""
    args, cfg = run.args, run.cfg
    resume = find_resume_point(args.checkpoint_path, args.resume, run.out, run.device, run.log)
    if resume:
        path, model, state = resume
        model = check_resume(path, model, state, run.model_cfg, cfg, run.identity, args.allow_config_change,
                             run.log)
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
        step, totals = restore_training_state(state, optimizer, scaler, run.batches, run.device)
        if run.master:
            truncate_metrics(run.out, step)
        run.log(f"resumed from {path} at step {step}")
    ddp = None
    if run.world > 1:
        # the balancing bias and load counters are per-rank buffers kept equal by summing loads, not broadcast
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    return Trainer(model, ddp, optimizer, scaler, amp_dtype, step, totals)


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step: the loop below and every benchmark run this


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


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def train_step(model, optimizer, next_batch, cfg: TrainConfig, *, amp_dtype=None, scaler=None, ddp=None,
               loss_fn=model_loss, balance: bool = True) -> StepResult:
    """One optimizer step over cfg.grad_accum_steps micro-batches from `next_batch()` -> (inputs, targets).

    Backward under autocast (and GradScaler for fp16), no_sync on all but the last micro-batch under DDP (`ddp`, the
    wrapped `model`), the expert loads summed over micro-batches (all-reduced over ranks), gradient clipping, then
    the optimizer step and the loss-free balancing bias update -- or, if any loss or the gradient is not finite,
    neither (the step is skipped). Expert loads are reset for the next step. `loss_fn(model, x, y)` is where
    another loss plugs in (the benchmarks run a transformers model through it); balancing applies to ours only, and
    not at all with balance=False (the loop passes it past cfg.balance_steps).
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
        if balancing and cfg.balance_bias and balance:
            model.update_bias(loads)  # once per optimizer step, from the whole global batch's loads
    if balancing:
        model.reset_expert_loads()
    return StepResult(micro_losses, grad_norm.detach(), loads, skipped)


# ----------------------------------------------------------------------------------------------------------------
# The loop: the schedule, a step, its metrics row, evaluation, samples and checkpoints


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
                                ddp=t.ddp, loss_fn=run.loss_fn,
                                balance=not cfg.balance_steps or step <= cfg.balance_steps)
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
                tokens_per_s = run.tokens_per_step / max(step_seconds, 1e-9)
                row = metrics_row(step, result.loss, lr, result.grad_norm, t.totals, tokens_per_s,
                                  tokens_per_s * flop_per_token / peak, result.loads)
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
                if run.master:
                    plot_metrics(run.out)  # the curve up to here, to see where it went wrong
                raise TrainingDiverged(divergence_message(run.out, step, diverged))
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


# ----------------------------------------------------------------------------------------------------------------
# Finish: the bias check across ranks, <out>/final and --publish; the command line


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
