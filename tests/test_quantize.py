"""quantize.py: the small storage of the shipped model (int4 routed experts, int8 rows, exact routers/kv_a/norms)
reads back through SmolLM2DeepSeek.from_pretrained, and `export` gives transformers a model with the same logits."""
import json
import os

import pytest
import torch

import quantize
from conftest import spread_model
from model import SmolLM2DeepSeek


def test_int4_groups_are_no_worse_than_plain_min_max_and_round_trip():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 64)
    w[0, 0, 5] = 9.0  # an outlier: clipping its group's range should pay
    parts = quantize.quantize_int4(w, 16)
    assert parts["q4"].shape == (3, 8, 32) and parts["q4"].dtype == torch.uint8
    assert parts["scale"].shape == (3, 8, 4) and parts["scale"].dtype == torch.uint8
    assert parts["min"].dtype == torch.int8 and parts["scale_step"].shape == (3, 8, 1)
    assert parts["min_step"].dtype == torch.float16
    got = quantize.dequantize_int4(parts, torch.float32)
    groups = w.reshape(3, 8, 4, 16)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale, lo = ((hi - lo) / 15).half().float(), lo.half().float()  # plain: min-max range, fp16 scale and minimum
    plain = (((groups - lo) / scale).round().clamp(0, 15) * scale + lo).reshape(w.shape)
    err, plain_err = (got - w).square(), (plain - w).square()
    # 8-bit group scales cost a little against fp16 ones; clipping must more than pay for it overall
    assert err.sum() < plain_err.sum()
    assert err[0, 0, :16].sum() < 0.5 * plain_err[0, 0, :16].sum()  # the outlier's group: clipping paid
    assert (got - w).abs().max() < 0.5  # no group is wrecked
    stored = sum(p.numel() * p.element_size() for p in quantize.quantize_int4(torch.randn(64, 512), 32).values())
    assert stored * 8 / (64 * 512) < 4.6  # 4.5 bits a weight (+ two fp16 row steps), not 5 as fp16 pairs
    q8 = quantize.quantize_int8(w.reshape(24, 64))
    assert ((quantize.dequantize_int8(q8, torch.float32) - w.reshape(24, 64)).abs()
            <= q8["scale"].float() / 2 + 1e-6).all()


def test_pack_reads_back_close_and_export_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = spread_model()
    src = tmp_path / "src"
    model.save_pretrained(src)
    (src / "training_state.pt").write_bytes(b"a run's optimizer state")  # a step_N directory's: not copied
    path = quantize.pack(str(src), str(tmp_path / "small"), group_size=16)
    assert sorted(os.listdir(tmp_path / "small")) == ["config.json", "generation_config.json",
                                                      quantize.QUANTIZED_FILE]
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        schemes = json.loads(f.metadata()["quantization"])
        keys = set(f.keys())
    assert schemes["model.layers.1.mlp.experts.0.gate_proj.weight"] == "int4-g16"
    assert schemes["model.layers.0.self_attn.q_proj.weight"] == "int8-row"
    assert schemes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == "bf16"  # never 4 or 8 bits
    assert "model.layers.1.mlp.gate.weight" in keys and "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    small = SmolLM2DeepSeek.from_pretrained(str(tmp_path / "small"))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        ref, got = model(ids), small(ids)
    assert 0 < (got - ref).abs().max() < 0.1 * ref.abs().max()  # quantized: close, not equal
    for name, p in model.named_parameters():  # what stays exact is bit-equal; kv_a is its bf16 rounding
        if "norm" in name or name.endswith("gate.weight"):
            assert torch.equal(p, dict(small.named_parameters())[name]), name
        if "kv_a_proj" in name:
            assert torch.equal(p.bfloat16().float(), dict(small.named_parameters())[name]), name
    out = quantize.export(str(tmp_path / "small"), str(tmp_path / "hf"), dtype=torch.float32)
    assert os.path.basename(out) == "model.safetensors"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, got, atol=1e-4)
    with pytest.raises(SystemExit):
        quantize.main(["pack", str(src), str(src)])


def test_which_storage_each_part_gets():
    w = torch.zeros(64, 32)
    assert quantize.scheme_for("model.layers.3.mlp.experts.5.down_proj.weight", w, 16) == "int4-g16"
    assert quantize.scheme_for("model.layers.3.mlp.shared_experts.down_proj.weight", w, 16) == "int8-row"
    assert quantize.scheme_for("model.embed_tokens.weight", w, 16) == "int8-row"
    assert quantize.scheme_for("model.embed_tokens.weight", w, 16, int4_embeddings=True) == "int4-g16"
    assert quantize.scheme_for("model.layers.3.self_attn.kv_a_proj_with_mqa.weight", w, 16) == "bf16"
    assert quantize.scheme_for("model.layers.3.mlp.gate.weight", w, 16) is None  # the router stays exact
    assert quantize.scheme_for("model.norm.weight", torch.zeros(32), 16) is None
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize.dequantize_state({"x.q3": torch.zeros(1)}, {"x": "int3-g8"})


def test_identical_tensors_are_stored_once_and_read_back_as_their_original():
    torch.manual_seed(0)
    expert = torch.randn(8, 32)
    state = {"model.layers.1.mlp.experts.0.up_proj.weight": torch.randn(8, 32),
             "model.layers.1.mlp.experts.1.up_proj.weight": expert,
             "model.layers.1.mlp.experts.2.up_proj.weight": expert.clone(),  # a copy no token reached
             "model.layers.1.mlp.experts.3.up_proj.weight": expert + 1e-6,  # close is not identical
             "model.norm.weight": torch.ones(32), "model.layers.0.input_layernorm.weight": torch.ones(32)}
    tensors, schemes = quantize.quantize_state(state, group_size=16)
    assert schemes["model.layers.1.mlp.experts.2.up_proj.weight"] == "same-as:model.layers.1.mlp.experts.1.up_proj.weight"
    assert schemes["model.layers.0.input_layernorm.weight"] == "same-as:model.norm.weight"
    assert schemes["model.layers.1.mlp.experts.3.up_proj.weight"] == "int4-g16"
    assert not any(k.startswith("model.layers.1.mlp.experts.2.") for k in tensors)  # nothing stored for the copy
    back = quantize.dequantize_state(tensors, schemes)
    assert torch.equal(back["model.layers.1.mlp.experts.2.up_proj.weight"],
                       back["model.layers.1.mlp.experts.1.up_proj.weight"])
    assert torch.equal(back["model.layers.0.input_layernorm.weight"], torch.ones(32))
    del tensors["model.norm.weight"]
    with pytest.raises(ValueError, match="stored as model.norm.weight"):
        quantize.dequantize_state(tensors, schemes)
