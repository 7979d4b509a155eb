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

MAX_CONTEXT = 1 << 20
LAYER_TYPES = ("full_attention", "linear_attention")
HYBRID_KEYS = ("layer_types", "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim")
# our field -> transformers' KimiLinearConfig name on disk (its attribute_map)
KIMI_NAMES = {"n_routed_experts": "num_experts", "num_experts_per_tok": "num_experts_per_token",
              "n_shared_experts": "num_shared_experts", "n_group": "num_expert_group",
              "norm_topk_prob": "moe_renormalize", "max_position_embeddings": "model_max_length"}  # positions; far beyond what this model is trained for, small enough to allocate

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
    # Hybrid (issue 22, transformers' kimi_linear): per layer "full_attention" (MLA) or "linear_attention" (KDA,
    # Kimi Delta Attention). Absent or all "full_attention": the MLA model, saved as deepseek_v3, as before.
    # A hybrid's MLA layers are NoPE (no rotation anywhere), as Kimi Linear's; its KDA layers carry position.
    layer_types: list | None = None
    linear_num_heads: int = 9
    linear_head_dim: int = 64
    linear_conv_kernel_dim: int = 4

    def __post_init__(self):
        positive = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "max_position_embeddings", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                    "rope_theta", "rms_norm_eps", "initializer_range", "routed_scaling_factor", "linear_num_heads",
                    "linear_head_dim", "linear_conv_kernel_dim"]
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
        if self.qk_rope_head_dim % 2 and not self.is_hybrid:  # a hybrid's MLA never rotates
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
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(f"key 'layer_types' must name one type per layer ({self.num_hidden_layers}), "
                                  f"got {len(self.layer_types)}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ConfigError(f"key 'layer_types': {bad[0]!r} is not one of {', '.join(LAYER_TYPES)}")
        if self.is_hybrid and self.n_shared_experts < 1:
            raise ConfigError("key 'n_shared_experts' must be >= 1 in a hybrid: transformers' KimiLinear MoE always "
                              "has a shared expert")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_hybrid(self) -> bool:
        """True when some layer is KDA: the model is then saved as kimi_linear and its MLA layers are NoPE."""
        return self.layer_types is not None and "linear_attention" in self.layer_types

    @property
    def mla_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_hybrid or
                self.layer_types[i] == "full_attention"]

    @property
    def kda_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_hybrid and
                self.layer_types[i] == "linear_attention"]

    @property
    def kda_state_values(self) -> int:
        """Values one KDA layer keeps per sequence whatever its length: the [heads, dk, dk] fp32 recurrent state and
        the last (kernel - 1) inputs of the short convolution over q, k and v."""
        D = self.linear_num_heads * self.linear_head_dim
        return self.linear_num_heads * self.linear_head_dim ** 2 + 3 * D * (self.linear_conv_kernel_dim - 1)

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
        if self.is_hybrid:
            return self._to_kimi_linear_dict()
        out = dataclasses.asdict(self)
        for key in HYBRID_KEYS:  # an MLA model's config.json stays exactly what it was before hybrids existed
            out.pop(key)
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
        if hf.get("model_type") == "kimi_linear":
            return cls._from_kimi_linear_dict(hf, where)
        if hf.get("model_type") != "deepseek_v3":
            raise ConfigError(f"{where}: model_type must be 'deepseek_v3' or 'kimi_linear', got "
                              f"{hf.get('model_type')!r}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{where}: rope type {rope.get('rope_type')!r} (e.g. YaRN) is not supported; "
                              "only the default rope is")
        for key, expected in [("hidden_act", "silu"), ("attention_bias", False)]:
            if hf.get(key, expected) != expected:
                raise ConfigError(f"{where}: key '{key}' = {hf[key]!r} is not supported (only {expected!r})")
        names = {f.name for f in dataclasses.fields(cls)} - set(HYBRID_KEYS)
        values = {k: v for k, v in hf.items() if k in names}
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if theta is not None:
            values["rope_theta"] = float(theta)
        for key in ["bos_token_id", "eos_token_id"]:  # transformers allows a list of eos ids; we use the first
            if isinstance(values.get(key), list):
                values[key] = values[key][0] if values[key] else None
        return cls.from_dict(values, where)

    def _to_kimi_linear_dict(self) -> dict:
        """config.json of a hybrid in transformers' kimi_linear format (KimiLinearConfig.to_dict's names), with
        layer_types and mlp_layer_types explicit. Our own keys (balancing, router extras) ride along; transformers
        keeps unknown keys as attributes and ignores them. No rope keys: a hybrid's MLA layers are NoPE."""
        out = dataclasses.asdict(self)
        for key in ("rope_theta", "rope_interleave"):
            out.pop(key)
        for ours, theirs in KIMI_NAMES.items():
            out[theirs] = out.pop(ours)
        out.update(
            model_type="kimi_linear",
            architectures=["KimiLinearForCausalLM"],
            num_key_value_heads=self.num_attention_heads,
            mlp_layer_types=["dense" if i < self.first_k_dense_replace else "sparse"
                             for i in range(self.num_hidden_layers)],
            layer_types=list(self.layer_types),
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            use_cache=True,
        )
        return out

    @classmethod
    def _from_kimi_linear_dict(cls, hf: dict, where: str) -> "ModelConfig":
        """A kimi_linear config.json, as transformers writes it or as Moonshot's checkpoints do (linear_attn_config
        with 1-indexed kda_layers / full_attn_layers), -> a hybrid ModelConfig."""
        for key, expected in [("hidden_act", "silu"), ("attention_bias", False)]:
            if hf.get(key, expected) != expected:
                raise ConfigError(f"{where}: key '{key}' = {hf[key]!r} is not supported (only {expected!r})")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_interleave"}
        values = {k: v for k, v in hf.items() if k in names}
        for ours, theirs in KIMI_NAMES.items():  # transformers' / Moonshot's names win over ours
            if theirs in hf:
                values[ours] = hf[theirs]
        if "num_experts" not in hf and "num_local_experts" in hf:
            values["n_routed_experts"] = hf["num_local_experts"]
        L = values.get("num_hidden_layers", cls.num_hidden_layers)
        linear = hf.get("linear_attn_config") or {}
        if not isinstance(linear, dict):
            raise ConfigError(f"{where}: key 'linear_attn_config' must be a mapping, got {linear!r}")
        for theirs, ours in [("head_dim", "linear_head_dim"), ("num_heads", "linear_num_heads"),
                             ("short_conv_kernel_size", "linear_conv_kernel_dim")]:
            if theirs in linear:
                values[ours] = linear[theirs]
        layer_types = hf.get("layer_types")
        if layer_types is None and "kda_layers" in linear and "full_attn_layers" in linear:
            layer_types = [None] * L
            try:
                for i in linear["full_attn_layers"]:
                    layer_types[i - 1] = "full_attention"  # 1-indexed in Moonshot's config
                for i in linear["kda_layers"]:
                    layer_types[i - 1] = "linear_attention"
            except (IndexError, TypeError):
                raise ConfigError(f"{where}: linear_attn_config's kda_layers / full_attn_layers must be layer "
                                  f"numbers 1..{L}") from None
        elif layer_types is None:  # transformers' default: MLA at every 4th layer after the first
            layer_types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(L)]
        values["layer_types"] = layer_types
        if "linear_attention" not in layer_types:
            raise ConfigError(f"{where}: a kimi_linear config without any 'linear_attention' layer is an all-NoPE "
                              "MLA model, which this project does not build (save an MLA model as deepseek_v3)")
        mlp_types = hf.get("mlp_layer_types")
        if mlp_types is not None:
            k = next((i for i, t in enumerate(mlp_types) if t != "dense"), len(mlp_types))
            if len(mlp_types) != L or any(t != "sparse" for t in mlp_types[k:]):
                raise ConfigError(f"{where}: key 'mlp_layer_types' must be 'dense' layers then 'sparse' ones, one "
                                  f"per layer ({L}), got {mlp_types!r}")
            values["first_k_dense_replace"] = k
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"]:
            if isinstance(values.get(key), list):
                values[key] = values[key][0] if values[key] else None
            vocab = values.get("vocab_size", cls.vocab_size)
            if isinstance(values.get(key), int) and not 0 <= values[key] < vocab:
                values[key] = None  # an id outside the vocabulary can never be produced or fed: as good as none
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
