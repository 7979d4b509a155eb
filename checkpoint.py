"""The run directory: checkpoints, metrics, samples, plot, the history a fresh start sets aside, and publishing.

    <out>/step_N/      config.json, model.safetensors, tokenizer files, training_state.pt (optimizer, scaler, data
                       position, totals, RNG, the TrainConfig and run identity); written to step_N.tmp and renamed
    <out>/metrics.jsonl  one row per logged step (truncated to the checkpoint's step on resume)
    <out>/samples.jsonl, training_plot.png
    <out>/final/       the last model without optimizer state, plus training_summary.json (what app.py serves)
    <out>/previous-<time>/   an older run's history, moved aside by a fresh start

Every file and directory is written beside its target and renamed into place, so a kill at any moment leaves
either the old or the new one (`clean_stale` tidies what it leaves). Only finite weights are ever written (the
caller checks with `all_finite`); `keep_last` rotation then drops only good checkpoints for newer good ones, and
`find_resume_checkpoint` names a damaged checkpoint and falls back to the one before it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch

from config import ConfigError, ModelConfig, TrainConfig
from data import PackedBatches
from generate import generate
from model import SmolLM2DeepSeek, max_violation


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, healthy only; the newest one that loads is where a run resumes


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


def find_resume_point(checkpoint_path: str | None, resume: str, out: str, device,
                      log) -> tuple[str, SmolLM2DeepSeek, dict] | None:
    """Where a run starts: --checkpoint_path, else --resume DIR, else (--resume auto) the newest checkpoint in `out`
    that loads. None means a fresh start (--resume none, or no usable checkpoint in `out`)."""
    if checkpoint_path:
        return (checkpoint_path, *load_checkpoint(checkpoint_path, device))
    if resume not in ("auto", "none"):
        return (resume, *load_checkpoint(resume, device))
    if resume == "auto":
        return find_resume_checkpoint(out, device, log)
    return None


def restore_training_state(state: dict, optimizer, scaler, batches, device) -> tuple[int, dict]:
    """save_checkpoint's training_state.pt back into the optimizer, scaler, data position and RNGs -> (step, totals)."""
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    batches.load_state_dict(state["data"])
    restore_rng(state["rng"], device)
    return state["step"], dict(state["totals"])


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])


def divergence_message(out: str, step: int, reason: str) -> str:
    """What a diverged run left: the last good checkpoint before `step`, and that nothing was published."""
    good = [path for s, path in step_dirs(out) if s < step]
    where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written"
    return (f"training diverged at step {step}: {reason}. No checkpoint was written from it; {where}; "
            f"{os.path.join(out, 'final')} was not published. Lower --lr (resuming needs --allow-config-change) "
            "or look for bad data")


# ----------------------------------------------------------------------------------------------------------------
# Resuming: what a checkpoint's run must share with this one


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


def config_changes(saved_model: ModelConfig, state: dict, model_cfg: ModelConfig, cfg: TrainConfig,
                   identity: dict) -> list[str]:
    """The settings of this run (model_cfg, cfg, identity) that differ from a checkpoint's (its model's config and
    training state), as 'key: saved -> now', where they change the run. Checkpoints from before a setting was saved
    are not compared on it."""
    changes = []
    for f in dataclasses.fields(ModelConfig):
        saved, now = getattr(saved_model, f.name), getattr(model_cfg, f.name)
        if saved != now:
            changes.append(f"model {f.name}: {saved!r} -> {now!r}")
    saved_train = state.get("train_config") or {}
    for key, now in dataclasses.asdict(cfg).items():
        if key not in RESUME_FREE_KEYS and key in saved_train and saved_train[key] != now:
            changes.append(f"{key}: {saved_train[key]!r} -> {now!r}")
    saved_run = state.get("run") or {}
    for key, saved in saved_run.items():  # a setting the checkpoint recorded and this run lacks is a change too
        now = identity.get(key)  # (one this run has that the checkpoint predates is not compared)
        if saved != now:
            changes.append(f"{key}: {saved!r} -> {now!r}")
    return changes


def check_resume(path: str, model: SmolLM2DeepSeek, state: dict, model_cfg: ModelConfig, cfg: TrainConfig,
                 identity: dict, allow_change: bool, log) -> SmolLM2DeepSeek:
    """A checkpoint trained with settings that change the run is refused, naming each, unless allow_change
    (--allow-config-change); then its weights go into a model built from this run's config. -> the model."""
    changes = config_changes(model.config, state, model_cfg, cfg, identity)
    if changes and not allow_change:
        raise ConfigError(f"checkpoint {path} was trained with other settings that change the run: "
                          f"{'; '.join(changes)}. Start a new run (another --out, or --resume none), or pass "
                          "--allow-config-change to continue with these changes")
    if changes:
        log(f"WARNING: continuing from {path} with changed settings (--allow-config-change): {'; '.join(changes)}")
    if model.config != model_cfg:
        model = adopt_model_config(model, model_cfg, path)
    return model.train()


def adopt_model_config(model: SmolLM2DeepSeek, config: ModelConfig, path: str) -> SmolLM2DeepSeek:
    """The checkpoint's weights in a model built from this run's (changed) config; the shapes must match."""
    new = SmolLM2DeepSeek(config).to(next(model.parameters()).device)
    try:
        new.load_state_dict(model.state_dict())
    except RuntimeError:
        raise ConfigError(f"checkpoint {path}: its weights do not fit this run's model config (a changed key "
                          "changes their shapes); only keys such as bias_update_speed can change on resume") from None
    return new


# ----------------------------------------------------------------------------------------------------------------
# Metrics, samples, plot and the directory's history


def metrics_row(step: int, loss: float, lr: float, grad_norm, totals: dict, tokens_per_s: float, mfu: float,
                loads: torch.Tensor) -> dict:
    """One row of metrics.jsonl (a logged step; the loop adds val_loss where it evaluated). loads: [MoE layers, E]."""
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
            "tokens_seen": totals["tokens_seen"], "skipped_steps": totals["skipped_steps"],
            "tokens_per_s": tokens_per_s, "mfu": mfu,
            "max_vio": max_violation(loads).tolist() if len(loads) else [], "expert_load": loads.int().tolist()}


def write_samples(model, tokenizer, cfg: TrainConfig, step: int, out: str, log) -> None:
    """Append the model's continuations of cfg.sample_prompts (seeded, so a resumed run writes the same) to
    <out>/samples.jsonl."""
    rows = []
    for i, prompt in enumerate(cfg.sample_prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed + i)
        new = [t.token_id for t in generate(model, ids, cfg.sample_tokens, temperature=0.8, top_k=50,
                                            generator=gen)]
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


# ----------------------------------------------------------------------------------------------------------------
# Publishing: <out>/final, and --publish DIR


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
