"""train.py on a tiny config and tiny data: exact resume after SIGKILL, phase 2, damaged checkpoints, bad inputs,
the bias update under gradient accumulation, and DDP with torchrun on CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (ROOT, TOKENIZER_DIR as TOKENIZER, TRAIN_TINY_YAML as TINY_YAML, needs_corpus, read_jsonl,
                      train_cmd, train_env)

pytestmark = needs_corpus


def run(cmd, train_data, **kw):
    return subprocess.run(cmd, env=train_env(train_data), capture_output=True, text=True, timeout=300, cwd=ROOT,
                          **kw)


def losses(out):
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference_run(train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = run(train_cmd(train_data, out), train_data)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_uninterrupted_run_writes_everything(reference_run):
    out = reference_run
    got = losses(out)
    assert sorted(got) == list(range(1, 11))  # phase 1 steps 1-8, phase 2 steps 9-10
    rows = read_jsonl(out / "metrics.jsonl")
    row = rows[2]
    for key in ["loss", "val_loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu", "max_vio", "expert_load"]:
        assert key in row, key
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1  # against the GEMM peak probed at start-up
    assert row["tokens_seen"] == 3 * 2 * 2 * 32
    assert len(row["max_vio"]) == 1 and len(row["expert_load"][0]) == 4
    assert os.path.isfile(out / "training_plot.png") and os.path.getsize(out / "training_plot.png") > 10_000
    final = out / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_summary.json"} <= set(os.listdir(final))
    assert json.load(open(final / "training_summary.json"))["step"] == 10
    # keep_last 2 plus the protected phase-1 checkpoint (step 8), which phase 2 starts from
    assert sorted(os.listdir(out)) == sorted(["final", "metrics.jsonl", "step_8", "step_9", "step_10",
                                              "training_plot.png"])


def test_sigkill_midway_then_resume_gives_identical_losses(train_data, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(train_data, out), env=train_env(train_data), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.isdir(out / "step_3") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(out / "step_3"), "the run never wrote its first checkpoint"
    assert not os.path.isdir(out / "final"), "the run finished before it could be killed"
    result = run(train_cmd(train_data, out), train_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert losses(out) == losses(reference_run)  # exactly, every step of both phases


def test_phase_two_starts_from_phase_one_checkpoint(train_data, reference_run, tmp_path):
    phase1 = tmp_path / "phase1"
    result = run(train_cmd(train_data, phase1, "--extra-steps", "0"), train_data)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(phase1 / "step_8" / "training_state.pt", weights_only=True)
    assert state["step"] == 8 and state["optimizer"]["state"]  # optimizer moments are saved
    phase2 = tmp_path / "phase2"
    result = run(train_cmd(train_data, phase2, "--checkpoint_path", str(phase1 / "step_8")), train_data)
    assert result.returncode == 0, result.stderr[-3000:]
    got = losses(phase2)
    assert sorted(got) == [9, 10]  # step numbers continue after phase 1
    ref = losses(reference_run)
    assert got[9] == ref[9] and got[10] == ref[10]  # same weights, optimizer state and data position


def train_then_truncate(train_data, out, steps: int, name: str, keep) -> None:
    """Train `steps` steps into `out`, then cut step_<steps>/<name> to keep(size) bytes, as a crash or full disk would."""
    result = run(train_cmd(train_data, out, "--steps", str(steps), "--extra-steps", "0"), train_data)
    assert result.returncode == 0, result.stderr[-3000:]
    path = out / f"step_{steps}" / name
    with open(path, "r+b") as f:
        f.truncate(keep(os.path.getsize(path)))


def test_truncated_checkpoint_is_reported_and_previous_one_used(train_data, tmp_path):
    out = tmp_path / "damaged"
    train_then_truncate(train_data, out, 6, "model.safetensors", keep=lambda size: size // 2)
    good = (out / "step_3" / "model.safetensors").read_bytes()
    result = run(train_cmd(train_data, out, "--steps", "4", "--extra-steps", "0", "--allow-config-change"),
                 train_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_6" in result.stderr and "unusable" in result.stderr
    assert "steps: 6 -> 4" in result.stderr  # the change is named
    assert "resumed from" in result.stderr and "step_3 at step 3" in result.stderr
    assert os.path.isdir(out / "step_4")
    # keep_last is 2: the damaged step_6 must not count, so the good step_3 survives beside step_4
    assert (out / "step_3" / "model.safetensors").read_bytes() == good


def test_truncated_training_state_is_named(train_data, tmp_path):
    out = tmp_path / "damaged_state"
    train_then_truncate(train_data, out, 3, "training_state.pt", keep=lambda size: 100)
    result = run(train_cmd(train_data, out, "--checkpoint_path", str(out / "step_3"), "--steps", "4"), train_data)
    assert result.returncode == 2
    assert "training_state.pt" in result.stderr and "corrupt" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_value_and_missing_data_are_clear_errors(train_data, tmp_path):
    out = tmp_path / "keep"
    os.makedirs(out / "step_5")
    (out / "step_5" / "marker").write_text("a good checkpoint")
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_YAML.replace("seq_len: 32", "seq_len: -4"))
    result = run([*train_cmd(train_data, out)[:2], "--config", str(bad), *train_cmd(train_data, out)[4:]], train_data)
    assert result.returncode == 2 and "seq_len" in result.stderr and "Traceback" not in result.stderr
    bad.write_text(TINY_YAML.replace("log_every: 1", "log_every: 1\n  warmup_step: 3"))
    result = run([*train_cmd(train_data, out)[:2], "--config", str(bad), *train_cmd(train_data, out)[4:]], train_data)
    assert result.returncode == 2 and "warmup_step" in result.stderr
    cmd = train_cmd(train_data, out)
    cmd[cmd.index("--data") + 1] = str(tmp_path / "nowhere.jsonl")
    result = run(cmd, train_data)
    assert result.returncode == 2 and "nowhere.jsonl" in result.stderr and "Traceback" not in result.stderr
    assert (out / "step_5" / "marker").read_text() == "a good checkpoint"


def test_bias_update_once_per_optimizer_step_under_accumulation(train_data, tmp_path, monkeypatch):
    import train
    from model import SmolLM2DeepSeek

    calls = []
    original = SmolLM2DeepSeek.update_bias

    def counting(self, loads=None):
        calls.append(loads.clone())
        return original(self, loads)

    monkeypatch.setattr(SmolLM2DeepSeek, "update_bias", counting)
    monkeypatch.setenv("XDG_CACHE_HOME", str(train_data / "cache"))
    out = tmp_path / "accum"
    train.main(train_cmd(train_data, out, "--steps", "4", "--extra-steps", "0", "--grad-accum", "3")[2:])
    assert len(calls) == 4  # one per optimizer step, not per micro-batch
    for loads in calls:  # each update sees all 3 micro-batches: 3 x 2 x 32 tokens x top-2
        assert loads.shape == (1, 4) and loads.sum().item() == 3 * 2 * 32 * 2
    rows = read_jsonl(out / "metrics.jsonl")
    assert [sum(r["expert_load"][0]) for r in rows] == [3 * 2 * 32 * 2] * 4
    bias = SmolLM2DeepSeek.from_pretrained(str(out / "final")).moe_layers[0].gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # it moved, through update_bias


def test_balance_steps_stops_the_bias_updates_after_that_step(train_data, tmp_path, monkeypatch):
    """balance_steps: N (config_heal.yaml's 400): the bias moves at steps 1..N and never after, so copies of one
    expert that the bias keeps apart are not driven into a tie (results/heal/balancing_crossover.json)."""
    import train
    from model import SmolLM2DeepSeek

    steps_seen = []
    original = SmolLM2DeepSeek.update_bias

    def counting(self, loads=None):
        steps_seen.append(len(steps_seen) + 1)
        return original(self, loads)

    monkeypatch.setattr(SmolLM2DeepSeek, "update_bias", counting)
    monkeypatch.setenv("XDG_CACHE_HOME", str(train_data / "cache"))
    config = tmp_path / "tiny_balance_steps.yaml"
    config.write_text((train_data / "tiny.yaml").read_text().replace("train:\n", "train:\n  balance_steps: 2\n", 1))
    cmd = train_cmd(train_data, tmp_path / "run", "--steps", "4", "--extra-steps", "1")[2:]
    cmd[cmd.index("--config") + 1] = str(config)
    train.main(cmd)
    assert len(steps_seen) == 2  # steps 1 and 2 of 5


def test_torchrun_two_ranks_keep_identical_bias(train_data, tmp_path):
    out = tmp_path / "ddp"
    import socket

    with socket.socket() as s:  # torchrun's rendezvous wants a concrete free port
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", port,
           *train_cmd(train_data, out, "--steps", "3", "--extra-steps", "0", "--device", "cpu")[1:]]
    result = run(cmd, train_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "balancing bias identical on all 2 ranks" in result.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [sum(r["expert_load"][0]) for r in rows] == [2 * 2 * 2 * 32 * 2] * 3  # loads summed over both ranks
    assert rows[-1]["tokens_seen"] == 3 * 2 * 2 * 2 * 32


def test_init_from_starts_fresh_training_from_given_weights(train_data, reference_run, tmp_path):
    """--init-from DIR: DIR's weights (routing bias included) and config.json, a fresh optimizer/schedule/position;
    the YAML's model: section is not used; a killed run in the same --out resumes from its own checkpoints."""
    from model import SmolLM2DeepSeek

    source = reference_run / "final"
    other_shape = tmp_path / "other.yaml"  # a model: section that does not fit the weights: ignored
    other_shape.write_text(TINY_YAML.replace("hidden_size: 32", "hidden_size: 48"))
    out = tmp_path / "healed"
    cmd = train_cmd(train_data, out, "--init-from", str(source), "--steps", "3", "--extra-steps", "0", "--lr", "1e-9")
    cmd[cmd.index("--config") + 1] = str(other_shape)
    result = run(cmd, train_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"starting from the weights in {source}" in result.stderr
    first = read_jsonl(out / "metrics.jsonl")[0]
    assert first["step"] == 1 and first["tokens_seen"] == 2 * 2 * 32  # a fresh position and step count
    a, b = SmolLM2DeepSeek.from_pretrained(str(source)), SmolLM2DeepSeek.from_pretrained(str(out / "final"))
    assert a.config == b.config
    # lr 1e-9: the weights barely move from the source's (a fresh init would be far off), and the routing bias
    # carried over (its own update moves it by 1e-3 per step)
    assert all((x - y).abs().max() < 1e-5 for x, y in zip(a.parameters(), b.parameters()))
    bias_a, bias_b = a.moe_layers[0].gate.e_score_correction_bias, b.moe_layers[0].gate.e_score_correction_bias
    assert bias_a.abs().sum() > 0 and (bias_a - bias_b).abs().max() <= 3 * 1e-3 + 1e-6
    again = run(cmd, train_data)  # the same command again: the finished run resumes, it does not restart
    assert again.returncode == 0 and "starting from the weights" not in again.stderr
    missing = run(train_cmd(train_data, tmp_path / "x", "--init-from", str(tmp_path / "nowhere")), train_data)
    assert missing.returncode == 2 and "no config.json" in missing.stderr and "Traceback" not in missing.stderr


def tiny_teacher(path, vocab_size=49152):
    """A random 1-layer transformers Llama with our vocabulary, saved where --distill-from can read it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def test_distillation_loss_is_ce_mixed_with_kl_to_the_teacher(tmp_path):
    """loss.distillation_loss: (1 - w) CE + w KL(teacher || model), per token, against full logits written out."""
    from config import ConfigError
    from conftest import tiny_config
    from loss import distillation_loss, load_teacher
    from model import SmolLM2DeepSeek

    teacher = load_teacher(tiny_teacher(tmp_path / "teacher", vocab_size=97), 97, torch.device("cpu"))
    torch.manual_seed(1)
    model = SmolLM2DeepSeek(tiny_config()).eval()
    x, y = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    log_q = torch.log_softmax(model(x), -1)
    log_p = torch.log_softmax(teacher(x).logits, -1)
    ce = torch.nn.functional.nll_loss(log_q.view(-1, 97), y.view(-1))
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    for w in (0.0, 0.5, 1.0):
        got = distillation_loss(teacher, w)(model, x, y)
        assert got.item() == pytest.approx(((1 - w) * ce + w * kl).item(), abs=1e-5), w
    with pytest.raises(ConfigError, match="vocabulary has 97 tokens"):
        load_teacher(str(tmp_path / "teacher"), 49152, torch.device("cpu"))
    with pytest.raises(ConfigError, match="cannot load the teacher"):
        load_teacher(str(tmp_path / "nowhere.gguf"), 97, torch.device("cpu"))


def test_distill_from_trains_and_resumes_exactly(train_data, reference_run, tmp_path):
    """--distill-from: weight 0 is plain cross-entropy (the reference run's losses); weight 1 trains on the
    teacher's distributions, and a SIGKILLed run resumes to identical losses; the teacher is part of the run."""
    teacher = tiny_teacher(tmp_path / "teacher")
    plain = run(train_cmd(train_data, tmp_path / "w0", "--distill-from", teacher, "--distill-weight", "0"), train_data)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert losses(tmp_path / "w0") == losses(reference_run)
    cmd = train_cmd(train_data, tmp_path / "kd", "--distill-from", teacher, "--distill-weight", "1")
    full = run(cmd, train_data)
    assert full.returncode == 0, full.stderr[-3000:]
    kd = losses(tmp_path / "kd")
    assert sorted(kd) == list(range(1, 11)) and kd[1] != losses(reference_run)[1]
    out = tmp_path / "killed"
    killed_cmd = train_cmd(train_data, out, "--distill-from", teacher, "--distill-weight", "1")
    proc = subprocess.Popen(killed_cmd, env=train_env(train_data), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not os.path.isdir(out / "step_6"):
        time.sleep(0.05)
        assert proc.poll() is None, "the run ended before its step-6 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(killed_cmd, train_data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == kd
    # the same run directory without the teacher is another run: refused, naming the teacher
    refused = run(train_cmd(train_data, out, "--steps", "9"), train_data)
    assert refused.returncode == 2 and "teacher" in refused.stderr


def test_data_repeat_weights_a_file_and_checks_its_counts(train_data, tmp_path):
    """--data-repeat 1 3: the second file's tokens appear three times in the stream (the data size tells), and a
    count per file is required."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"text": f"Question {i}? Answer {i}."}) + "\n" for i in range(40)))
    out = tmp_path / "mixed"
    ok = run(train_cmd(train_data, out, "--steps", "1", "--extra-steps", "0") + ["--data", str(train_data / "train.jsonl"),
             str(chat), "--data-repeat", "1", "3"], train_data)
    assert ok.returncode == 0, ok.stderr[-3000:]
    once = run(train_cmd(train_data, tmp_path / "once", "--steps", "1", "--extra-steps", "0")
               + ["--data", str(train_data / "train.jsonl"), str(chat)], train_data)
    assert once.returncode == 0, once.stderr[-3000:]
    sizes = [torch.load(os.path.join(d, "step_1", "training_state.pt"), weights_only=False)["run"]["train_tokens"]
             for d in (out, tmp_path / "once")]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    chat_tokens = sum(len(tok(json.loads(line)["text"])["input_ids"]) + 1 for line in chat.read_text().splitlines())
    assert sizes[0] - sizes[1] == 2 * chat_tokens
    bad = run(train_cmd(train_data, tmp_path / "bad") + ["--data-repeat", "2", "1"], train_data)
    assert bad.returncode == 2 and "--data-repeat takes one count" in bad.stderr
