"""The training loss: cross-entropy of the tied lm_head's logits, computed chunk by chunk.

With a 49152-token vocabulary the [tokens, vocab] logits are the largest tensor of a step (200 MB in fp32 for 1024
tokens) and, at d = 192, the three lm_head GEMMs are most of its FLOPs. `ChunkedCrossEntropy` never holds more than
[V, chunk] logits and forms the gradients in the same pass.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class SoftTargets:
    """A teacher's next-token distributions for distillation, as the teacher's final hidden states [N, d_t] and its
    lm_head weight [V, d_t]: its [N, V] logits are formed chunk by chunk beside the student's, never all at once.
    The loss becomes (1 - kl_weight) * CE + kl_weight * KL(teacher || student), per token."""

    hidden: torch.Tensor
    weight: torch.Tensor
    kl_weight: float


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (h @ W^T) computed chunk by chunk: the [N, V] logits (V = 49152) are never held at once.

    The gradients are formed in the forward pass, chunk by chunk (softmax - onehot), so the backward pass is just
    a scale. Same FLOPs as the plain version; peak memory drops from N*V to chunk*V floats.

    With `teacher` (SoftTargets) the target of each token is a mix of its one-hot and the teacher's distribution p:
    loss = (1 - w) CE + w KL(p || q), whose gradient in the student's logits is q - (1 - w) onehot - w p. The
    teacher's [V, chunk] logits take a second buffer; KL = sum p log p - sum p z + logsumexp(z).

    Speed (bench/bench_train.py): the logits are laid out vocab-major, [V, chunk] = W @ h^T. With d = 192 the three
    lm_head GEMMs are thin, and MKL runs the vocab-major forms (W @ h^T, P @ h, P^T @ W) ~1.3x faster on this CPU
    than the token-major ones. The softmax is written out as five in-place passes (max, sub, exp, sum, scale) over
    the one buffer: torch's fused log_softmax over dim 0 is 4x slower, and logsumexp allocates temporaries.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, workspace: torch.Tensor | None = None,
                grad_enabled: bool = True, teacher: SoftTargets | None = None,
                teacher_workspace: torch.Tensor | None = None):
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        scale = valid.float() / n_valid  # d(mean loss)/d(token loss); 0 for ignored tokens
        safe_targets = targets.clamp(min=0)
        w = teacher.kl_weight if teacher is not None else 0.0
        # needs_input_grad is True under no_grad too, so the caller says whether a backward can follow (evaluation
        # would otherwise pay for the two gradient GEMMs it never uses)
        needs_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.empty_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start:start + chunk_size]
            tc = safe_targets[start:start + chunk_size].unsqueeze(0)  # [1, c]
            sc = scale[start:start + chunk_size]
            rows = max(1, (1 << 20) // hc.shape[0])  # row blocks of ~4 MB that stay in cache
            if w > 0:
                # the teacher's exp(z_t - peak_t) [V, c], its sum S and sum exp(z_t - peak_t) (z_t - peak_t): then
                # p = e / S and sum p log p = A / S - log S
                t_logits = _vocab_major(teacher.weight, teacher.hidden[start:start + chunk_size], teacher_workspace)
                t_logits.sub_(t_logits.amax(0))
                t_sum, t_dot = torch.zeros_like(sc), torch.zeros_like(sc)
                for block in t_logits.split(rows):
                    e = block.exp()
                    t_sum += e.sum(0)
                    t_dot += (e * block).sum(0)
                    block.copy_(e)
            logits = _vocab_major(weight, hc, workspace)  # [V, c]
            target_logit = logits.gather(0, tc).squeeze(0)
            peak = logits.amax(0)
            # exp(z - peak) in place, in row blocks that stay in cache while they are shifted, exponentiated and
            # summed: one pass over the [V, c] buffer from memory instead of three
            sums = torch.zeros_like(peak)
            cross = torch.zeros_like(peak)  # sum e_t z (the teacher-weighted student logits, times S)
            for i, block in enumerate(logits.split(rows)):
                if w > 0:
                    cross += (t_logits[i * rows:(i + 1) * rows] * block).sum(0)
                sums += block.sub_(peak).exp_().sum(0)
            log_z = peak + sums.log()
            token_loss = log_z - target_logit
            if w > 0:
                kl = t_dot / t_sum - t_sum.log() - cross / t_sum + log_z
                token_loss = (1 - w) * token_loss + w * kl
            total += (token_loss * sc).sum()
            if needs_grad:
                # d loss / d z = (exp(z - peak) / sums - (1 - w) onehot - w p) * scale. Without a teacher the
                # per-token factor scale / sums goes into the small [c, d] operands of the GEMMs, not over the
                # [V, c] buffer: (E diag(f)) h = E (diag(f) h); the one-hot term touches only the target rows.
                # With one, the buffer becomes the whole soft part, E diag(f) - w P diag(scale), in one pass.
                f = (sc / sums).unsqueeze(1)  # [c, 1]
                if w > 0:
                    g = (w * sc / t_sum)
                    for i, block in enumerate(logits.split(rows)):
                        block.mul_(f.t()).sub_(t_logits[i * rows:(i + 1) * rows] * g)
                    f = torch.ones_like(f)
                hf = hc.float()
                hard = (1 - w) * sc.unsqueeze(1)  # the one-hot term's weight per token
                grad_h[start:start + chunk_size] = ((logits.t().to(h.dtype) @ weight.to(h.dtype)) * f
                                                    - hard * weight[tc[0]].to(h.dtype))
                if start == 0:
                    torch.mm(logits, hf * f, out=grad_w)
                else:
                    grad_w.addmm_(logits, hf * f)
                grad_w.index_add_(0, tc[0], hf * -hard)
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # in place: a copy of grad_w would be another 37 MB allocation (the version counter still stops a second
        # backward through the same graph from reusing the scaled tensors)
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None, None, None, None, None


def _vocab_major(weight: torch.Tensor, hc: torch.Tensor, workspace: torch.Tensor | None) -> torch.Tensor:
    """[V, c] fp32 logits W @ hc^T, in the caller's reused buffer where there is one."""
    if workspace is not None:  # [V, c] view of the caller's reused buffer
        return torch.mm(weight, hc.t(), out=workspace[:weight.shape[0] * hc.shape[0]].view(-1, hc.shape[0]))
    return (weight.to(hc.dtype) @ hc.t()).float()


class ChunkedCrossEntropy:
    """loss = ChunkedCrossEntropy()(h [N, d], weight [V, d], targets [N]) -> mean loss over targets != -100.

    On CPU the [V, chunk] fp32 logits live in one buffer kept between calls: glibc hands a freed block this large
    (100 MB for 512 tokens) back to the OS, so a fresh one per step page-faults back in, which made the first lm_head
    GEMM 2x slower (130 vs 65 ms). CUDA's caching allocator already reuses its blocks."""

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size
        self._buffer = None
        self._teacher_buffer = None

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 teacher: SoftTargets | None = None) -> torch.Tensor:
        columns = min(h.shape[0], self.chunk_size)
        workspace = self._workspace(h, weight, columns, "_buffer")
        teacher_workspace = None
        if teacher is not None:
            if teacher.weight.shape[0] != weight.shape[0] or teacher.hidden.shape[0] != h.shape[0]:
                raise ValueError(f"teacher logits [{teacher.hidden.shape[0]}, {teacher.weight.shape[0]}] do not "
                                 f"match the student's [{h.shape[0]}, {weight.shape[0]}]")
            teacher_workspace = self._workspace(teacher.hidden, teacher.weight, columns, "_teacher_buffer")
        return LinearCrossEntropy.apply(h, weight, targets, self.chunk_size, workspace, torch.is_grad_enabled(),
                                        teacher, teacher_workspace)

    def _workspace(self, h: torch.Tensor, weight: torch.Tensor, columns: int, name: str) -> torch.Tensor | None:
        if not (h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32):
            return None
        needed = weight.shape[0] * columns
        if getattr(self, name) is None or getattr(self, name).numel() < needed:
            setattr(self, name, torch.empty(needed))
        return getattr(self, name)


# ----------------------------------------------------------------------------------------------------------------
# Distillation: train.py --distill-from


def load_teacher(path: str, vocab_size: int, device: torch.device):
    """The --distill-from model, frozen in eval mode: a transformers causal LM (directory or hub id) or a .gguf file
    (read by transformers; needs the `gguf` package). Its vocabulary must be the student's, token for token."""
    from config import ConfigError

    try:  # the teacher's construction draws random init values: never from the run's own random stream
        with torch.random.fork_rng(devices=[]):
            teacher = _load_causal_lm(path)
    except Exception as err:
        raise ConfigError(f"--distill-from {path}: cannot load the teacher ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    size = teacher.get_output_embeddings().weight.shape[0]
    if size != vocab_size:
        raise ConfigError(f"--distill-from {path}: the teacher's vocabulary has {size} tokens, the model's "
                          f"{vocab_size}: distillation needs the same vocabulary")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _load_causal_lm(path: str):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        folder, name = os.path.split(os.path.abspath(path))
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def distillation_loss(teacher, kl_weight: float):
    """A train_step loss_fn: the model's loss with the teacher's next-token distributions mixed in (SoftTargets: the
    teacher's final hidden states and lm_head, so its [tokens, vocab] logits are formed chunk by chunk)."""

    def loss_fn(model, x, y):
        with torch.no_grad():
            hidden = teacher.base_model(input_ids=x).last_hidden_state
        soft = SoftTargets(hidden.reshape(-1, hidden.shape[-1]), teacher.get_output_embeddings().weight, kl_weight)
        return model(x, y, teacher=soft)[1]

    return loss_fn
