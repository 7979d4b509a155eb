"""train.py with only attention, norms and routers trainable (embedding/lm_head, dense FFN, shared and routed experts
frozen): a probe of whether healing the converted model's attention alone recovers most of the loss. Same CLI as
train.py; it wraps train.build_optimizer (no code change to train.py).
    OMP_NUM_THREADS=2 nice -n 19 python3 scripts/convert_smollm2/train_attn_only.py <train.py arguments>
"""
import os, sys
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
import train

_orig = train.build_optimizer


def build_optimizer(model, cfg, device):
    trainable = 0
    for name, p in model.named_parameters():
        keep = ".self_attn." in name or "norm" in name or ".gate." in name
        p.requires_grad_(keep)
        trainable += p.numel() if keep else 0
    print(f"attn-only: {trainable / 1e6:.2f}M trainable of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
          flush=True)
    opt = _orig(model, cfg, device)
    return opt


train.build_optimizer = build_optimizer
if __name__ == "__main__":
    sys.exit(train.cli(sys.argv[1:]))
