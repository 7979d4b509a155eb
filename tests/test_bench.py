"""bench/: the GPU training benchmark runs end to end (on CPU, tiny, eager) and writes what the README reads."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_training_benchmark_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "train_gpu.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_train_gpu.py"), "--device", "cpu",
                             "--tiny", "--no-compile", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["torch"] and data["gemm_peak_tflops"] > 0
    assert set(data["models"]) == {"ours eager", "transformers deepseek_v3", "dense llama eager"}
    for name, row in data["models"].items():
        assert row["tok_per_s"] > 0 and 0 < row["mfu"] < 1, (name, row)
    # the same weights in ours and the transformers twin: the same first-step loss
    models = data["models"]
    assert abs(models["ours eager"]["first_loss"] - models["transformers deepseek_v3"]["first_loss"]) < 1e-4


def run_bench(script, *args, timeout=1200):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_decode_benchmark_interleaves_the_sides_and_records_load(tmp_path):
    """A smoke run on a tiny config (no timing is judged: a loaded machine may even give no rate for a round)."""
    out = tmp_path / "decode.json"
    run_bench("bench_decode.py", "--tiny", "--no-compile", "--rounds", "2", "--new", "3", "--prompts", "8", "12",
              "--out", str(out))
    data = json.loads(out.read_text())
    assert len(data["per_round"]) == 2 and data["per_round"][0]["order"] != data["per_round"][1]["order"]
    for r in data["per_round"]:
        assert len(r["loadavg_before"]) == 3 and set(r["tok_s"]["8"]) == {"transformers", "ours eager"}
    for n in ("8", "12"):
        row = data["summary"][n]
        assert set(row) == {"transformers", "ours eager"}
        assert row["ours eager"]["same_greedy_tokens_every_round"] is True
        assert {"fastest_tok_s", "median_tok_s", "ratio_fastest", "ratio_median"} <= set(row["ours eager"])


def test_app_load_benchmark_compares_per_stream_and_batched_serving(tmp_path):
    """A smoke run through the served page with a tiny checkpoint: every mode at every number of users, all served."""
    from conftest import HAVE_TOKENIZER, make_tiny_checkpoint

    if not HAVE_TOKENIZER:
        import pytest
        pytest.skip("needs the SmolLM2 tokenizer")
    out = tmp_path / "app_load.json"
    run_bench("bench_app_load.py", "--model-dir", make_tiny_checkpoint(tmp_path), "--users", "1", "3", "--batch", "2",
              "--tokens", "3", "--rounds", "1", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["modes"] == ["per-stream", "batched <= 2"]
    assert sorted((r["mode"], r["users"]) for r in data["rows"]) == [
        ("batched <= 2", 1), ("batched <= 2", 3), ("per-stream", 1), ("per-stream", 3)]
    for r in data["rows"]:
        assert r["served"] == r["users"] and r["busy"] == 0 and r["tokens"] >= r["users"], r
        assert len(r["loadavg_before"]) == 3
    assert set(data["median_over_rounds"]) == {"per-stream", "batched <= 2"}
    assert "tok_s_4_users_over_1" not in data["goals"]["batched <= 2"]  # 4 users were not run
    assert data["start"]["busiest"] and data["end"]["loadavg"]


def test_long_decode_benchmark_smoke_run(tmp_path):
    out = tmp_path / "long_decode.json"
    run_bench("bench_long_decode.py", "--tiny", "--no-transformers", "--contexts", "8", "40", "--steps", "2",
              "--out", str(out))
    data = json.loads(out.read_text())
    rows = data["models"]
    assert set(rows) == {"ours all-MLA", "ours hybrid"}
    for row in rows.values():
        assert all(r["step_ms"] > 0 and r["cache_bytes"] > 0 for r in row.values())
    # the all-MLA cache grows with the context; the hybrid's grows 4x slower (one MLA layer of four)
    mla, hyb = rows["ours all-MLA"], rows["ours hybrid"]
    assert mla["40"]["cache_bytes"] == 5 * mla["8"]["cache_bytes"]
    assert (hyb["40"]["cache_bytes"] - hyb["8"]["cache_bytes"]) * 4 == mla["40"]["cache_bytes"] - mla["8"]["cache_bytes"]


def test_shipped_benchmark_measures_load_memory_and_one_stream(tmp_path):
    """bench_shipped.py through the app's loading path on a tiny checkpoint: the fields the README quotes."""
    from conftest import HAVE_TOKENIZER, make_tiny_checkpoint

    if not HAVE_TOKENIZER:
        import pytest
        pytest.skip("needs the SmolLM2 tokenizer")
    out = tmp_path / "shipped.json"
    run_bench("bench_shipped.py", "--model", make_tiny_checkpoint(tmp_path), "--prompt", "16", "--new", "6",
              "--rounds", "2", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["prompt_tokens"] == 16 and data["new_tokens"] == 6 and data["load_s"] > 0
    assert data["eager"]["tokens_per_s_best"] >= data["eager"]["tokens_per_s_median"] > 0
    assert data["rss_peak_gib"] >= data["rss_after_load_gib"] > 0 and len(data["loadavg_before_after"]) == 2
    assert data["torch"] and data["cpu"] and data["cpu_count"] >= 1
