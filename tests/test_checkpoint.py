"""checkpoint.py, the run directory: a checkpoint written and read back restores the run exactly (weights,
optimizer, data position, RNG); keep_last rotates all but the protected phase-1 checkpoint; a damaged newest
checkpoint is named and the previous one used; resume names every setting that changes the run; metrics rows keep
their on-disk fields; truncation on resume and the clean-up after a kill leave whole files."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
from config import TrainConfig
from conftest import read_jsonl, tiny_config
from data import PackedBatches
from model import SmolLM2DeepSeek

CPU = torch.device("cpu")


def trained_run(out, tokenizer, steps, cfg, protect=()):
    """A tiny model trained `steps` optimizer steps, checkpointed after each -> (model, optimizer, batches)."""
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = PackedBatches(np.arange(2000, dtype=np.uint16) % 97, batch_size=2, seq_len=8, seed=3)
    for step in range(1, steps + 1):
        x, y = batches.next()
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
        checkpoint.save_checkpoint(str(out), step, model, tokenizer, optimizer, None, batches,
                                   {"tokens_seen": 16 * step, "skipped_steps": 0, "train_seconds": 0.5 * step}, cfg,
                                   protect, {"world_size": 1})
    return model, optimizer, batches


def test_checkpoint_round_trip_restores_the_run_exactly(tmp_path, tokenizer):
    cfg = TrainConfig(keep_last=2)
    model, optimizer, batches = trained_run(tmp_path, tokenizer, 4, cfg, protect={1})
    assert [s for s, _ in checkpoint.step_dirs(str(tmp_path))] == [1, 3, 4]  # keep_last 2, plus the protected one
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    expected_noise = torch.rand(3)  # what the RNG gives next after the last checkpoint
    path, loaded, state = checkpoint.find_resume_point(None, "auto", str(tmp_path), CPU, log=print)
    assert path.endswith("step_4") and state["step"] == 4 and state["run"] == {"world_size": 1}
    assert state["train_config"] == dataclasses.asdict(cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    new_optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    new_batches = PackedBatches(batches.tokens, batch_size=2, seq_len=8, seed=3)
    torch.manual_seed(123)  # anything else in between
    step, totals = checkpoint.restore_training_state(state, new_optimizer, None, new_batches, CPU)
    assert step == 4 and totals["tokens_seen"] == 64 and new_batches.position == batches.position
    assert torch.equal(torch.rand(3), expected_noise)  # the RNG continues where the checkpoint left it
    for m, opt, b in [(model, optimizer, batches), (loaded, new_optimizer, new_batches)]:  # one more step each
        x, y = b.next()
        m(x, y)[1].backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert checkpoint.find_resume_point(None, "none", str(tmp_path), CPU, log=print) is None
    assert checkpoint.find_resume_point(str(tmp_path / "step_3"), "auto", str(tmp_path), CPU, print)[2]["step"] == 3


@pytest.mark.parametrize("damage", ["truncated-state", "non-finite", "no-state"])
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, tokenizer, damage):
    trained_run(tmp_path, tokenizer, 2, TrainConfig(keep_last=3))
    newest = tmp_path / "step_2"
    if damage == "truncated-state":
        blob = (newest / "training_state.pt").read_bytes()
        (newest / "training_state.pt").write_bytes(blob[: len(blob) // 2])
    elif damage == "no-state":
        os.remove(newest / "training_state.pt")
    else:
        model = SmolLM2DeepSeek.from_pretrained(str(newest))
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        model.save_pretrained(str(newest))
    logged = []
    path, model, state = checkpoint.find_resume_checkpoint(str(tmp_path), CPU, logged.append)
    assert path.endswith("step_1") and state["step"] == 1 and checkpoint.all_finite(model)
    assert len(logged) == 1 and "step_2" in logged[0] and "unusable" in logged[0]
    assert newest.is_dir()  # reported, never deleted
    with pytest.raises((ValueError, FileNotFoundError), match="step_2"):
        checkpoint.find_resume_point(str(newest), "auto", str(tmp_path), CPU, print)


def test_resume_names_each_setting_that_changes_the_run(tmp_path):
    model_cfg, cfg = tiny_config(), TrainConfig(lr=1e-3, seed=1)
    state = {"train_config": dataclasses.asdict(cfg), "run": {"world_size": 1, "train_tokens": 500}}
    model = SmolLM2DeepSeek(model_cfg)
    free = dataclasses.replace(cfg, log_every=7, keep_last=9, extra_steps=99, tokenizer="elsewhere")
    assert checkpoint.config_changes(model_cfg, state, model_cfg, free, {"world_size": 1, "train_tokens": 500}) == []
    changed = dataclasses.replace(cfg, lr=2e-3, batch_size=16)
    now_cfg = tiny_config(bias_update_speed=0.01)
    changes = checkpoint.config_changes(model_cfg, state, now_cfg, changed, {"world_size": 2, "train_tokens": 500})
    assert changes == ["model bias_update_speed: 0.001 -> 0.01", "batch_size: 8 -> 16", "lr: 0.001 -> 0.002",
                       "world_size: 1 -> 2"]
    with pytest.raises(ValueError, match="bias_update_speed.*--allow-config-change"):
        checkpoint.check_resume("ckpt", model, state, now_cfg, changed, {"world_size": 2}, False, print)
    logged = []
    adopted = checkpoint.check_resume("ckpt", model, state, now_cfg, changed, {"world_size": 2}, True, logged.append)
    assert adopted.config == now_cfg and adopted.training and "changed settings" in logged[0]
    assert torch.equal(adopted.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="do not fit"):
        checkpoint.check_resume("ckpt", model, state, tiny_config(hidden_size=96), cfg, {}, True, print)
    # checkpoints from before a setting was recorded are not compared on it
    assert checkpoint.config_changes(model_cfg, {}, model_cfg, changed, {"world_size": 2}) == []


def test_metrics_rows_keep_their_fields(tmp_path):
    """The rows of metrics.jsonl are read by the plot, publish_final, tests and older runs' tooling: same keys,
    same order."""
    loads = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    row = checkpoint.metrics_row(10, 2.5, 1e-3, torch.tensor(0.75), {"tokens_seen": 640, "skipped_steps": 1}, 100.0,
                                 0.25, loads)
    assert list(row) == ["step", "loss", "lr", "grad_norm", "tokens_seen", "skipped_steps", "tokens_per_s", "mfu",
                         "max_vio", "expert_load"]
    assert row["grad_norm"] == 0.75 and row["expert_load"] == [[3, 1], [2, 2]] and row["max_vio"] == [0.5, 0.0]
    json.dumps(row, allow_nan=False)
    empty = checkpoint.metrics_row(1, 2.5, 1e-3, 0.5, {"tokens_seen": 1, "skipped_steps": 0}, 1.0, 0.1,
                                   torch.zeros(0, 0))
    assert empty["max_vio"] == [] and empty["expert_load"] == []


def test_fresh_start_sets_history_aside(tmp_path):
    for name in ["metrics.jsonl", "samples.jsonl", "training_plot.png"]:
        (tmp_path / name).write_text(name)
    (tmp_path / "step_5").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "notes.txt").write_text("not the run's")
    logged = []
    checkpoint.set_history_aside(str(tmp_path), logged.append)
    aside = [n for n in os.listdir(tmp_path) if n.startswith("previous-")]
    assert len(aside) == 1 and sorted(os.listdir(tmp_path)) == sorted(aside + ["notes.txt"])
    assert sorted(os.listdir(tmp_path / aside[0])) == ["final", "metrics.jsonl", "samples.jsonl", "step_5",
                                                       "training_plot.png"]
    checkpoint.set_history_aside(str(tmp_path), logged.append)  # nothing left to set aside
    assert len(logged) == 1


def test_truncate_metrics_rewrites_whole_files_and_drops_cut_lines(tmp_path):
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 6, "lo')
    (tmp_path / "samples.jsonl").write_text('{"step": 3, "text": "a"}\n{"step": 6, "text": "b"}\n{"step"')
    checkpoint.truncate_metrics(str(tmp_path), 3)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [3]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "samples.jsonl"]


def test_interrupted_replace_of_final_is_undone(tmp_path):
    (tmp_path / "final.old").mkdir()  # killed between renaming final away and renaming the new one in
    (tmp_path / "final.old" / "model.safetensors").write_text("the published model")
    (tmp_path / "final.tmp").mkdir()
    checkpoint.clean_stale(str(tmp_path), log=lambda msg: None)
    assert (tmp_path / "final" / "model.safetensors").read_text() == "the published model"
    assert sorted(os.listdir(tmp_path)) == ["final"]
