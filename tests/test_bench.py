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


def test_long_decode_benchmark_smoke_run(tmp_path):
    out = tmp_path / "long_decode.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_long_decode.py"), "--tiny",
                             "--no-transformers", "--contexts", "8", "40", "--steps", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["models"]
    assert set(rows) == {"ours all-MLA", "ours hybrid"}
    for row in rows.values():
        assert all(r["step_ms"] > 0 and r["cache_bytes"] > 0 for r in row.values())
    # the all-MLA cache grows with the context; the hybrid's grows 4x slower (one MLA layer of four)
    mla, hyb = rows["ours all-MLA"], rows["ours hybrid"]
    assert mla["40"]["cache_bytes"] == 5 * mla["8"]["cache_bytes"]
    assert (hyb["40"]["cache_bytes"] - hyb["8"]["cache_bytes"]) * 4 == mla["40"]["cache_bytes"] - mla["8"]["cache_bytes"]
