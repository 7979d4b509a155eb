"""Configuration: `ModelConfig` (the model's shape, field names as transformers' DeepseekV3Config), `TrainConfig`
(train.py's settings, a checkpoint's record of its run) and the one loader that turns YAML or config.json mappings
into checked dataclasses, naming any bad key.

    ModelConfig.from_yaml("config_smollm2_135.yaml")      # the `model:` section of a run config
    ModelConfig.from_hf_dict(json.load(open("config.json")))
    dataclass_from_dict(TrainConfig, data["train"], where="run.yaml [train]")   # the `train:` section
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field

MAX_CONTEXT = 1 << 20  # positions; far beyond what this model is trained for, small enough to allocate

# ----------------------------------------------------------------------------------------------------------------
# Configuration


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value; the message names the key."""


def dataclass_from_dict(cls, values: dict, where: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type by name.

    The one config loader of the project: ModelConfig and TrainConfig both go through it.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)
        ok = any(_value_has_type(value, t) for t in allowed)
        if not ok:
            names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
            raise ConfigError(f"{where}: key '{key}' must be {names}, got {value!r}")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _value_has_type(value, t) -> bool:
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:  # YAML writes 1e-3 as a string only without a dot; accept ints for floats
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, t)


def read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
                              ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'model:' (and 'train:') sections")
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; expected 'model' and 'train'")
    return data


@dataclass
class ModelConfig:
    """The model's shape. Field names are those of transformers' DeepseekV3Config so config.json maps 1:1."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536  # dense SwiGLU layers (< first_k_dense_replace)
    moe_intermediate_size: int = 512  # each routed / shared expert
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    # MLA
    q_lora_rank: int | None = None  # None: plain q_proj (right for a model this small, as DeepSeek-V2-Lite)
    kv_lora_rank: int = 128  # dc: the cached latent
    qk_nope_head_dim: int = 48
    qk_rope_head_dim: int = 16  # dr: the one rope key shared by all heads, cached too
    v_head_dim: int = 64
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    max_position_embeddings: int = 2048
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Auxiliary-loss-free balancing and optional router extras (ours; transformers ignores them)
    bias_update_speed: float = 1e-3  # gamma in b_i += gamma * sign(mean(c) - c_i)
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss (DeepSeek-V3 eq. 17-20); 0 = off
    router_z_loss_coef: float = 0.0  # 0 = off
    router_jitter: float = 0.0  # multiplicative input noise for the gate in training; 0 = off
    # Misc
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None

    def __post_init__(self):
        positive = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "max_position_embeddings", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                    "rope_theta", "rms_norm_eps", "initializer_range", "routed_scaling_factor"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"key '{key}' must be > 0, got {getattr(self, key)!r}")
        nonnegative = ["n_shared_experts", "first_k_dense_replace", "bias_update_speed", "aux_loss_alpha",
                       "router_z_loss_coef", "router_jitter"]
        for key in nonnegative:
            if getattr(self, key) < 0:
                raise ConfigError(f"key '{key}' must be >= 0, got {getattr(self, key)!r}")
        if self.max_position_embeddings > MAX_CONTEXT:  # the rope tables alone would need 8 bytes per position
            raise ConfigError(f"key 'max_position_embeddings' must be <= {MAX_CONTEXT}, got "
                              f"{self.max_position_embeddings}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"key 'q_lora_rank' must be > 0 or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"key 'qk_rope_head_dim' must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"key 'num_experts_per_tok' ({self.num_experts_per_tok}) must be <= "
                              f"n_routed_experts ({self.n_routed_experts})")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"key 'n_group' ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            raise ConfigError(f"key 'topk_group' ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ConfigError("key 'n_group': group-limited routing scores each group by its top-2 experts, "
                              "so every group needs >= 2 experts")
        if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ConfigError("key 'num_experts_per_tok' exceeds the experts in the topk_group chosen groups")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(f"key 'first_k_dense_replace' ({self.first_k_dense_replace}) must be <= "
                              f"num_hidden_layers ({self.num_hidden_layers})")
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"]:
            value = getattr(self, key)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"key '{key}' must be a token id in [0, vocab_size), got {value!r}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def kv_cache_values_per_token(self) -> int:
        """Values cached per token per layer: the normalised latent and the roped shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_dict(cls, values: dict, where: str = "model config") -> "ModelConfig":
        return dataclass_from_dict(cls, values, where)

    @classmethod
    def from_yaml(cls, path: str) -> "ModelConfig":
        data = read_yaml(path)
        if "model" not in data:
            raise ConfigError(f"{path}: missing the 'model:' section")
        return cls.from_dict(data["model"], where=f"{path} [model]")

    # -- Hugging Face config.json --------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        out = dataclasses.asdict(self)
        theta = out.pop("rope_theta")
        out.update(
            model_type="deepseek_v3",
            architectures=["DeepseekV3ForCausalLM"],
            num_key_value_heads=self.num_attention_heads,  # MLA: every head has its own (expanded) key
            rope_parameters={"rope_type": "default", "rope_theta": theta},
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            num_nextn_predict_layers=0,  # no multi-token-prediction module
            use_cache=True,
        )
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        if not isinstance(hf, dict):
            raise ConfigError(f"{where}: expected a JSON object (a mapping of keys to values), got "
                              f"{type(hf).__name__}")
        if hf.get("model_type") != "deepseek_v3":
            raise ConfigError(f"{where}: model_type must be 'deepseek_v3', got {hf.get('model_type')!r}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{where}: rope type {rope.get('rope_type')!r} (e.g. YaRN) is not supported; "
                              "only the default rope is")
        for key, expected in [("hidden_act", "silu"), ("attention_bias", False)]:
            if hf.get(key, expected) != expected:
                raise ConfigError(f"{where}: key '{key}' = {hf[key]!r} is not supported (only {expected!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in names}
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if theta is not None:
            values["rope_theta"] = float(theta)
        for key in ["bos_token_id", "eos_token_id"]:  # transformers allows a list of eos ids; we use the first
            if isinstance(values.get(key), list):
                values[key] = values[key][0] if values[key] else None
        return cls.from_dict(values, where)


# ----------------------------------------------------------------------------------------------------------------
# Training settings (the `train:` section of a run config; train.py's flags override some)

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
    balance_steps: int = 0  # > 0: the bias updates stop after this step (0: they run all the way)
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
        for key in ["steps", "extra_steps", "warmup_steps", "weight_decay", "eps", "sample_tokens", "balance_steps"]:
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
