"""The trainer under faults and bad input: a diverging run stops and publishes nothing, --out is a run directory
and publishing is explicit, a fresh start keeps the old history aside, resume refuses changed settings, bad inputs
are one clear line. Tiny config, CPU, a few steps; most runs are in-process
(train.cli, the command line's entry point) to stay fast."""
import json
import math
import os
import subprocess

import pytest
import torch

from conftest import ROOT, TRAIN_TINY_YAML, needs_corpus, read_jsonl, train_cmd, train_env

pytestmark = needs_corpus


@pytest.fixture
def trainer(train_data, monkeypatch, capsys):
    """run(out, *flags) -> (exit code, stderr) of `python train.py` on the tiny config, in this process."""
    import train

    monkeypatch.setenv("XDG_CACHE_HOME", str(train_data / "cache"))

    def run(out, *extra, data=None):
        argv = train_cmd(train_data, out, *extra)[2:]
        if data is not None:
            argv[argv.index("--data") + 1] = str(data)
        code = train.cli(argv)
        return code, capsys.readouterr().err

    return run


def error_line(err: str) -> str:
    """The one line a failed run ends with; nothing like a traceback before it."""
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    return last


def steps_logged(out) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl")]


def model_is_finite(path) -> bool:
    from model import SmolLM2DeepSeek

    model = SmolLM2DeepSeek.from_pretrained(str(path))
    return all(torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())


def strict_json(path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# -- divergence ----------------------------------------------------------------------------------------------------


def test_huge_lr_stops_with_exit_3_and_publishes_nothing(train_data, tmp_path):
    """--lr 1e30 used to skip 9 of 10 steps with a warning each, exit 0 and publish weights of 5e29 as final."""
    out = tmp_path / "huge_lr"
    result = subprocess.run(train_cmd(train_data, out, "--lr", "1e30"), env=train_env(train_data),
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 3, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert "diverged" in line and "was not published" in line
    assert not (out / "final").exists()
    for step_dir in out.glob("step_*"):  # whatever was saved is a model that still trained
        assert model_is_finite(step_dir), step_dir


def test_skipped_steps_in_a_row_stop_the_run(trainer, tmp_path):
    out = tmp_path / "streak"
    code, err = trainer(out, "--lr", "1e30", "--max-skipped-steps", "3")
    assert code == 3
    assert "3 steps in a row skipped" in error_line(err)
    assert steps_logged(out)[-1] == 4  # step 1 applied (it made the weights huge), 2-4 skipped, stop
    assert not (out / "final").exists()


def inject(monkeypatch, at_call: int, fault):
    """Wrap train.train_step: on its at_call-th call, fault(model, kwargs) runs first."""
    import train

    calls, original = [], train.train_step

    def wrapped(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            fault(model, kwargs)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", wrapped)


def test_nan_weight_stops_and_keeps_the_last_good_checkpoint(trainer, tmp_path, monkeypatch):
    """A NaN in one weight used to skip every later step, exit 0 and save the NaN model as step_N and final, with
    keep_last rotating the good checkpoints away."""
    def nan_weight(model, kwargs):
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")

    inject(monkeypatch, at_call=5, fault=nan_weight)
    out = tmp_path / "nan"
    code, err = trainer(out)
    assert code == 3
    line = error_line(err)
    assert "diverged at step 6" in line and "step_3" in line  # the step-6 evaluation is NaN
    assert sorted(p.name for p in out.glob("step_*")) == ["step_3"]  # never rotated out, nothing saved after it
    assert model_is_finite(out / "step_3")
    assert not (out / "final").exists()


def test_one_bad_batch_is_skipped_and_the_run_still_finishes(trainer, tmp_path, monkeypatch):
    import train

    def nan_loss(model, kwargs):
        kwargs["loss_fn"] = lambda m, x, y: train.model_loss(m, x, y) * float("nan")

    inject(monkeypatch, at_call=3, fault=nan_loss)  # step 3 is a checkpoint step: its checkpoint waits for step 4
    out = tmp_path / "transient"
    code, err = trainer(out, "--steps", "5", "--extra-steps", "0")
    assert code == 0, err[-3000:]
    assert "step 3: non-finite loss" in err and "its checkpoint waits" in err
    rows = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}
    assert rows[3]["skipped_steps"] == 1 and rows[5]["skipped_steps"] == 1
    assert sorted(p.name for p in out.glob("step_*")) == ["step_4", "step_5"]
    summary = strict_json(out / "final" / "training_summary.json")  # no NaN from the skipped step's loss
    assert summary["step"] == 5 and math.isfinite(summary["train_loss"])


# -- where a run writes, and publishing ------------------------------------------------------------------------------


def test_default_out_is_a_run_directory_not_the_shipped_model():
    import train

    assert train.parse_args([]).out == os.path.join("runs", "config_smollm2_135")
    assert train.parse_args(["--config", "config_cpu.yaml"]).out == os.path.join("runs", "config_cpu")
    assert train.parse_args(["--config", "config_cpu.yaml"]).publish is None


def test_publish_replaces_the_shipped_directory_as_one_run(trainer, tmp_path):
    shipped = tmp_path / "checkpoints"
    (shipped / "final").mkdir(parents=True)
    (shipped / "final" / "old_weights").write_text("the old model")
    (shipped / "metrics.jsonl").write_text('{"step": 5050, "loss": 3.0}\n')
    (shipped / "samples.jsonl").write_text('{"step": 5050, "prompt": "a", "text": "a b"}\n')
    out = tmp_path / "run"
    code, err = trainer(out, "--steps", "3", "--extra-steps", "0", "--publish", str(shipped))
    assert code == 0, err[-3000:]
    assert strict_json(shipped / "final" / "training_summary.json")["step"] == 3
    assert not (shipped / "final" / "old_weights").exists()
    assert (shipped / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()  # replaced, not appended
    assert not (shipped / "samples.jsonl").exists()  # this run has none (--no-samples): none of the old run's
    assert (shipped / "training_plot.png").read_bytes() == (out / "training_plot.png").read_bytes()
    assert not list(shipped.glob("*.tmp"))


# -- history: fresh starts, resumes, leftovers ---------------------------------------------------------------------


def test_fresh_start_sets_old_history_aside_and_cleans_leftovers(trainer, tmp_path):
    out = tmp_path / "again"
    code, err = trainer(out, "--steps", "3", "--extra-steps", "0")
    assert code == 0, err[-3000:]
    (out / "step_6.tmp").mkdir()  # a kill mid-checkpoint
    (out / "step_6.tmp" / "model.safetensors").write_text("half")
    (out / "metrics.jsonl.tmp").write_text("half")  # a kill mid-rewrite
    code, err = trainer(out, "--steps", "3", "--extra-steps", "0", "--resume", "none")
    assert code == 0, err[-3000:]
    assert steps_logged(out) == [1, 2, 3]  # not 1 2 3 1 2 3
    [aside] = out.glob("previous-*")
    assert steps_logged(aside) == [1, 2, 3] and (aside / "step_3").is_dir() and (aside / "final").is_dir()
    assert not list(out.glob("*.tmp"))
    assert sorted(p.name for p in out.glob("step_*")) == ["step_3"]


def test_kill_before_the_first_checkpoint_does_not_duplicate_steps(trainer, tmp_path):
    out = tmp_path / "early_kill"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 10.8}\n{"step": 2, "loss": 10.7}\n{"step": 3, "lo')
    code, err = trainer(out, "--steps", "3", "--extra-steps", "0")
    assert code == 0, err[-3000:]
    assert steps_logged(out) == [1, 2, 3]
    [aside] = out.glob("previous-*")
    assert "previous-" in err and (aside / "metrics.jsonl").read_text().startswith('{"step": 1')


def test_resume_refuses_changed_settings_and_names_them(trainer, tmp_path):
    out = tmp_path / "changed"
    base = ["--steps", "3", "--extra-steps", "0"]
    code, err = trainer(out, *base)
    assert code == 0, err[-3000:]
    code, err = trainer(out, *base, "--batch-size", "3", "--seq-len", "16", "--seed", "7", "--lr", "0.01")
    assert code == 2
    line = error_line(err)
    for change in ["batch_size: 2 -> 3", "seq_len: 32 -> 16", "seed: 1337 -> 7", "lr: 0.003 -> 0.01",
                   "--allow-config-change"]:
        assert change in line, change
    assert steps_logged(out) == [1, 2, 3]  # the refused run changed nothing
    code, err = trainer(out, *base, "--max-skipped-steps", "5")  # a setting that does not change the run
    assert code == 0 and "resumed from" in err, err[-3000:]
    code, err = trainer(out, "--steps", "4", "--extra-steps", "0", "--lr", "0.01", "--allow-config-change")
    assert code == 0, err[-3000:]
    assert "steps: 3 -> 4" in err and "lr: 0.003 -> 0.01" in err
    assert steps_logged(out) == [1, 2, 3, 4]


def test_checkpoint_with_non_finite_weights_is_not_resumed(trainer, tmp_path):
    from model import SmolLM2DeepSeek

    out = tmp_path / "nan_checkpoint"
    code, err = trainer(out, "--steps", "3", "--extra-steps", "0")
    assert code == 0, err[-3000:]
    model = SmolLM2DeepSeek.from_pretrained(str(out / "step_3"))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(str(out / "step_3"))  # as an older trainer would have saved it
    code, err = trainer(out, "--steps", "3", "--extra-steps", "0")
    assert code == 0, err[-3000:]
    assert "non-finite weights" in err and "resumed from" not in err  # started afresh, the bad one set aside
    assert model_is_finite(out / "final")


# -- bad input: one line naming the file, argument or value, exit 2 --------------------------------------------------


def test_out_naming_a_file_is_one_line_from_the_command_line(train_data, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    result = subprocess.run(train_cmd(train_data, tmp_path / "a_file"), env=train_env(train_data),
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --out {tmp_path / 'a_file'}: is a file, not a directory"


@pytest.mark.parametrize("name, content, expected", [
    ("number.jsonl", b'{"text": "fine"}\n{"text": 12345}\n', ["number.jsonl:2", "'text' must be a string", "int"]),
    ("latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', ["latin1.jsonl:2", "not UTF-8", "0xe9"]),
    ("latin1.txt", b"one document\n\ncaf\xff\n", ["latin1.txt", "not UTF-8", "0xff", "offset 17"]),
    ("list.jsonl", b'["text"]\n', ["list.jsonl:1", "'text' field"]),
    ("garbage.npy", b"not numpy at all", ["garbage.npy", "not a readable .npy"]),
])
def test_bad_data_file_is_one_line_naming_it(trainer, tmp_path, name, content, expected):
    bad = tmp_path / name
    bad.write_bytes(content)
    code, err = trainer(tmp_path / "out", data=bad)
    assert code == 2
    assert err.strip().count("\n") == 0, err  # one line
    for piece in expected:
        assert piece in err, piece


def test_non_utf8_config_is_one_line_naming_it(trainer, train_data, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes(b"# r\xe9glages\n" + TRAIN_TINY_YAML.encode())
    out = tmp_path / "out"
    code, err = trainer(out, "--config", str(config))
    assert code == 2 and err.strip().count("\n") == 0, err
    assert str(config) in err and "not UTF-8" in err and "0xe9" in err


def test_nothing_to_train_is_one_line(trainer, tmp_path):
    code, err = trainer(tmp_path / "out", "--steps", "0", "--extra-steps", "0")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "nothing to train" in err and "step_0" not in err
