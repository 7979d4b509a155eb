"""Small storage for a checkpoint: the routed experts in 4 bits, the other matrices in 8 bits, the rest as it is.

    python3 quantize.py pack runs/config_heal/final checkpoints/final      # -> model.quantized.safetensors
    python3 quantize.py export checkpoints/final exported/                 # -> bf16 model.safetensors (transformers)

Why this split (measured on the converted SmolLM2-135M, one part quantized at a time, held-out loss change): the
routed experts are 205 M of the 288 M parameters and take 4 bits at +0.04 (group 64); the dense and shared FFN
(+0.19 at 4 bits) and attention (+0.02) are 8 bits per row (int8 everywhere: +0.010); `kv_a_proj_with_mqa`
(+1.95 at 4 bits: it carries the large scales of the converted latent norm) is bf16; the routers, norms and the
balancing bias stay fp32. About 0.2 GB instead of 1.15 GB.

Formats, per tensor, in transformers' deepseek_v3 key space (the keys `SmolLM2DeepSeek.hf_state_dict` writes):
  int4, group G along the input dimension (asymmetric, as GGUF's Q4_1): KEY.q4 uint8 [..., in / 2] (two codes per
  byte, low nibble first); each group's scale and minimum in 8 bits under its row's fp16 step, as GGUF's k-quants:
  KEY.scale uint8 and KEY.min int8 [..., in / G], KEY.scale_step and KEY.min_step fp16 [..., 1];
  w = code * scale * scale_step + min * min_step (4.5 bits a weight at G = 32). Each group's range is clipped by
  the factor (of a few) that gives the smallest squared error.
  int8 per row (symmetric): KEY.q8 int8 [..., in], KEY.scale fp16 [..., 1]; w = code * scale.
  bf16: KEY.bf16.
  same-as:OTHER: nothing stored; the tensor is bit-identical to OTHER's (before quantization), e.g. the conversion's
  copies of an expert that no token has been routed to yet.
The file's metadata says which scheme each key uses ("quantization": JSON {key: "int4-g32" | "int8-row" | "bf16" |
"same-as:OTHER"}).
`SmolLM2DeepSeek.from_pretrained` reads it (dequantized once, at load, to its dtype). transformers cannot read the
codes: the file is named model.quantized.safetensors so that it never mistakes them for weights, and `export`
writes the dequantized bf16 model.safetensors it loads with AutoModelForCausalLM.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil

import torch

QUANTIZED_FILE = "model.quantized.safetensors"
CLIP_FACTORS = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)
SAME_AS = "same-as:"
SCHEME_PARTS = {"int4": ("q4", "scale", "scale_step", "min", "min_step"), "int8-row": ("q8", "scale"),
                "bf16": ("bf16",)}


def scheme_for(key: str, tensor: torch.Tensor, group_size: int, int4_embeddings: bool = False) -> str | None:
    """Which storage a transformers-format key gets (None: kept as it is)."""
    if tensor.dim() != 2 or not key.endswith(".weight") or key.endswith("mlp.gate.weight"):
        return None  # norms, biases, the balancing bias and the routers stay exact
    if "kv_a_proj_with_mqa" in key:
        return "bf16"  # the latent down-projection: no 4 or 8 bits (its rows carry the latent norm's large scales)
    four_bits = ".mlp.experts." in key or (int4_embeddings and key in ("model.embed_tokens.weight", "lm_head.weight"))
    if four_bits and tensor.shape[-1] % group_size == 0:
        return f"int4-g{group_size}"
    return "int8-row"


def _codes_8bit(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 8-bit codes of a group quantity [..., groups]: (codes, the row's fp16 step [..., 1])."""
    top = 127 if signed else 255
    step = (values.abs().amax(-1, keepdim=True) / top).clamp(min=1e-10).half().clamp(min=6e-8)
    codes = (values / step.float()).round().clamp(-top if signed else 0, top)
    return codes.to(torch.int8 if signed else torch.uint8), step


def quantize_int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    groups = w.float().reshape(*w.shape[:-1], -1, group_size)  # [..., in / G, G]
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    mid = (lo + hi) / 2
    best = None
    for factor in CLIP_FACTORS:  # shrink the range around its middle: outliers clip, the rest get finer steps
        g_lo, g_hi = mid + (lo - mid) * factor, mid + (hi - mid) * factor
        scale = ((g_hi - g_lo) / 15).clamp(min=1e-8)
        codes = ((groups - g_lo) / scale).round().clamp(0, 15)
        err = (codes * scale + g_lo - groups).square().sum(-1, keepdim=True)
        if best is None:
            best = [err, scale, g_lo]
        else:
            better = err < best[0]
            for i, new in enumerate((err, scale, g_lo)):
                best[i] = torch.where(better, new, best[i])
    _, scale, low = best
    # Each group's scale and minimum in 8 bits under its row's fp16 step (as GGUF's k-quants): 4.5 bits a weight
    # instead of 5 with fp16 pairs; the codes are then fitted to the stored (rounded) scale and minimum.
    scale_codes, scale_step = _codes_8bit(scale.squeeze(-1), signed=False)
    scale_codes = scale_codes.clamp(min=1)
    min_codes, min_step = _codes_8bit(low.squeeze(-1), signed=True)
    scale = (scale_codes.float() * scale_step.float()).unsqueeze(-1)
    low = (min_codes.float() * min_step.float()).unsqueeze(-1)
    codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.uint8).reshape(*w.shape)
    return {"q4": codes[..., 0::2] | (codes[..., 1::2] << 4), "scale": scale_codes, "scale_step": scale_step,
            "min": min_codes, "min_step": min_step}


def dequantize_int4(parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    packed = parts["q4"]
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1).float()
    groups = codes.reshape(*codes.shape[:-1], parts["scale"].shape[-1], -1)
    scale = parts["scale"].float() * parts["scale_step"].float()
    low = parts["min"].float() * parts["min_step"].float()
    w = groups * scale.unsqueeze(-1) + low.unsqueeze(-1)
    return w.reshape(codes.shape).to(dtype)


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = (w.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12).half()
    return {"q8": (w.float() / scale.float()).round().clamp(-127, 127).to(torch.int8), "scale": scale}


def dequantize_int8(parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return (parts["q8"].float() * parts["scale"].float()).to(dtype)


def kind_of(scheme: str) -> str:
    """A scheme's storage kind: "int4-g32" -> "int4"; "int8-row" and "bf16" are their own."""
    return "int4" if scheme.startswith("int4-g") else scheme


QUANTIZERS = {"int4": quantize_int4, "int8-row": lambda w, group_size: quantize_int8(w),
              "bf16": lambda w, group_size: {"bf16": w.to(torch.bfloat16)}}
DEQUANTIZERS = {"int4": dequantize_int4, "int8-row": dequantize_int8,
                "bf16": lambda parts, dtype: parts["bf16"].to(dtype)}


def quantize_state(state: dict[str, torch.Tensor], group_size: int = 32,
                   int4_embeddings: bool = False) -> tuple[dict, dict]:
    """transformers-format state -> (tensors to save, {key: scheme})."""
    tensors, schemes, seen = {}, {}, {}
    for key, w in state.items():
        # a tensor bit-identical to one already stored (the conversion's copies of an expert that no token has
        # reached yet) is stored once: the later key names the earlier ("same-as:KEY")
        raw = w.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        digest = (w.dtype, tuple(w.shape), hashlib.sha256(raw).digest())
        if digest in seen:
            schemes[key] = SAME_AS + seen[digest]
            continue
        seen[digest] = key
        scheme = scheme_for(key, w, group_size, int4_embeddings)
        if scheme is None:
            tensors[key] = w.contiguous()
            continue
        parts = QUANTIZERS[kind_of(scheme)](w, group_size)
        for name, part in parts.items():
            tensors[f"{key}.{name}"] = part.contiguous()
        schemes[key] = scheme
    return tensors, schemes


def dequantize_state(tensors: dict[str, torch.Tensor], schemes: dict[str, str],
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    state = {key: t for key, t in tensors.items() if key.rsplit(".", 1)[0] not in schemes}
    aliases = {key: scheme[len(SAME_AS):] for key, scheme in schemes.items() if scheme.startswith(SAME_AS)}
    for key, scheme in schemes.items():
        if key in aliases:
            continue
        kind = kind_of(scheme)
        if kind not in SCHEME_PARTS:
            raise ValueError(f"unknown quantization scheme {scheme!r} for {key}")
        names = SCHEME_PARTS[kind]
        missing = [f"{key}.{n}" for n in names if f"{key}.{n}" not in tensors]
        if missing:
            raise ValueError(f"quantized weights lack {', '.join(missing)}")
        state[key] = DEQUANTIZERS[kind]({n: tensors[f"{key}.{n}"] for n in names}, dtype)
    for key, original in aliases.items():
        if original not in state:
            raise ValueError(f"quantized weights: {key} is stored as {original}, which the file lacks")
        state[key] = state[original].clone()
    return state


def read_quantized(path: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A model.quantized.safetensors file -> its transformers-format state, dequantized."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "quantization" not in meta:
        raise ValueError(f"{path} has no 'quantization' metadata: not written by quantize.py")
    return dequantize_state(load_file(path), json.loads(meta["quantization"]), dtype)


def copy_side_files(src: str, dst: str) -> None:
    """Everything in a model directory but its weights and a run's optimizer state (config, tokenizer, training
    summary, experts report, model card)."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith((".safetensors", ".pt")) and name != "model.safetensors.index.json" and \
                os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


class HybridNotSupported(ValueError):
    """quantize.py pack was given a hybrid (issue 22) checkpoint."""


def pack(src: str, dst: str, group_size: int = 32, int4_embeddings: bool = False) -> str:
    """A model directory -> the same directory with its weights in model.quantized.safetensors."""
    from safetensors.torch import save_file

    from model import SmolLM2DeepSeek

    model = SmolLM2DeepSeek.from_pretrained(src)
    if model.config.is_hybrid:
        raise HybridNotSupported(f"{src}: a KDA + MLA hybrid (kimi_linear) cannot be packed: the storage schemes "
                                 "were chosen and measured for deepseek_v3's keys (its routers and experts are "
                                 "named otherwise in kimi_linear); keep its model.safetensors")
    tensors, schemes = quantize_state(model.hf_state_dict(), group_size, int4_embeddings)
    copy_side_files(src, dst)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(dst, stale)):
            os.remove(os.path.join(dst, stale))
    path = os.path.join(dst, QUANTIZED_FILE)
    save_file(tensors, path, metadata={"format": "pt", "quantization": json.dumps(schemes)})
    os.chmod(path, 0o644)
    return path


def export(src: str, dst: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Any checkpoint we read -> transformers' deepseek_v3 model.safetensors (bf16 by default), for
    AutoModelForCausalLM.from_pretrained(dst)."""
    from model import SmolLM2DeepSeek

    model = SmolLM2DeepSeek.from_pretrained(src)
    copy_side_files(src, dst)
    model.save_pretrained(dst, dtype=dtype)
    return os.path.join(dst, "model.safetensors")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="store a model directory's weights small (int4 experts, int8 the rest)")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--group-size", type=int, default=32, help="int4 group along the input dimension (default 32)")
    a.add_argument("--int4-embeddings", action="store_true", help="the (tied) embedding in 4 bits too, not 8")
    b = sub.add_parser("export", help="write a transformers-loadable model.safetensors (dequantized)")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = p.parse_args(argv)
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        p.error("src and dst must be different directories")
    if args.command == "pack":
        path = pack(args.src, args.dst, args.group_size, args.int4_embeddings)
    else:
        path = export(args.src, args.dst, getattr(torch, args.dtype))
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
