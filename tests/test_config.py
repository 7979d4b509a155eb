"""config.py: every bad key or value is named; the shipped YAML configs load with the design card's sizes."""
import json
import os

import pytest
import torch

from config import ConfigError, ModelConfig
from conftest import ROOT, SMOLLM2_GQA_VALUES, TINY
from model import SmolLM2DeepSeek


@pytest.mark.parametrize("bad, message", [
    ({"hidden_sise": 64}, "hidden_sise"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"qk_rope_head_dim": 5}, "qk_rope_head_dim"),
    ({"n_group": 3}, "n_group"),
    ({"rope_interleave": "yes"}, "rope_interleave"),
])
def test_bad_config_names_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**TINY, **bad})


def test_bad_yaml_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 64\n  moe_intermediate_sizee: 12\n")
    with pytest.raises(ConfigError, match="moe_intermediate_sizee"):
        ModelConfig.from_yaml(str(path))
    path.write_text("modle:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match="modle"):
        ModelConfig.from_yaml(str(path))


def test_shipped_configs_load_and_full_model_is_135m_active():
    full = ModelConfig.from_yaml(os.path.join(ROOT, "config_smollm2_135.yaml"))
    with torch.device("meta"):
        counts = SmolLM2DeepSeek(full).count_parameters()
    assert 125e6 <= counts["active"] <= 145e6, counts
    assert counts["total"] > 2 * counts["active"]
    assert full.kv_cache_values_per_token / SMOLLM2_GQA_VALUES <= 0.40
    small = ModelConfig.from_yaml(os.path.join(ROOT, "config_cpu.yaml"))
    assert small.n_routed_experts > 1 and small.num_moe_layers > 0


def test_hybrid_config_is_the_design_card_with_kda_layers():
    full = ModelConfig.from_yaml(os.path.join(ROOT, "config_smollm2_135.yaml"))
    hybrid = ModelConfig.from_yaml(os.path.join(ROOT, "config_hybrid.yaml"))
    assert hybrid.is_hybrid and hybrid.mla_layers == [3, 7, 11, 15, 19, 23, 27, 29]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "n_routed_experts",
                "moe_intermediate_size", "vocab_size"):
        assert getattr(hybrid, key) == getattr(full, key), key
    assert hybrid.linear_num_heads * hybrid.linear_head_dim == hybrid.hidden_size
    # the cache at 8192 tokens: latents of 8 layers of 30 plus the fixed KDA states, <= 0.3x all-MLA's
    tokens = 8192
    ours = len(hybrid.mla_layers) * tokens * 144 + len(hybrid.kda_layers) * hybrid.kda_state_values
    assert ours <= 0.3 * full.num_hidden_layers * tokens * 144
    # the CPU twin (for a trained comparison): config_cpu.yaml but for the KDA layers
    cpu, twin = (ModelConfig.from_yaml(os.path.join(ROOT, name)) for name in ("config_cpu.yaml",
                                                                              "config_cpu_hybrid.yaml"))
    differ = {k for k, v in vars(cpu).items() if getattr(twin, k) != v}
    assert differ == {"layer_types", "linear_num_heads", "linear_head_dim"} and twin.mla_layers == [3]


@pytest.mark.parametrize("hf, message", [
    ([1, 2, 3], "mapping"),
    ({"model_type": "llama"}, "model_type"),
])
def test_bad_hf_config_is_named(hf, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(hf, where="x/config.json")


def test_absurd_context_is_refused_before_allocating():
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        ModelConfig.from_dict({**TINY, "max_position_embeddings": 2 ** 31})


def test_hf_dict_round_trip():
    config = ModelConfig.from_dict({**TINY, "rope_theta": 17.78})
    again = ModelConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict())))
    assert again == config


def test_space_config_is_sized_for_the_corpus():
    """config_space.yaml: the 51.3M (32.7M active) candidate, its run 3-5 passes over the 11.34M-token corpus."""
    from config import read_yaml, dataclass_from_dict
    from config import TrainConfig

    data = read_yaml(os.path.join(ROOT, "config_space.yaml"))
    model_cfg = ModelConfig.from_dict(data["model"])
    train_cfg = dataclass_from_dict(TrainConfig, data["train"], "config_space.yaml [train]")
    with torch.device("meta"):
        counts = SmolLM2DeepSeek(model_cfg).count_parameters()
    assert round(counts["total"] / 1e6, 1) == 51.3 and round(counts["active"] / 1e6, 1) == 32.7
    tokens = train_cfg.steps * train_cfg.batch_size * train_cfg.grad_accum_steps * train_cfg.seq_len
    assert 3 <= tokens / 11.34e6 <= 5
    assert train_cfg.seq_len <= model_cfg.max_position_embeddings
