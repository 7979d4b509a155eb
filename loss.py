"""The training loss: cross-entropy of the tied lm_head's logits, computed chunk by chunk.

With a 49152-token vocabulary the [tokens, vocab] logits are the largest tensor of a step (200 MB in fp32 for 1024
tokens) and, at d = 192, the three lm_head GEMMs are most of its FLOPs. `ChunkedCrossEntropy` never holds more than
[V, chunk] logits and forms the gradients in the same pass.
"""
from __future__ import annotations

import torch


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (h @ W^T) computed chunk by chunk: the [N, V] logits (V = 49152) are never held at once.

    The gradients are formed in the forward pass, chunk by chunk (softmax - onehot), so the backward pass is just
    a scale. Same FLOPs as the plain version; peak memory drops from N*V to chunk*V floats.

    Speed (bench/bench_train.py): the logits are laid out vocab-major, [V, chunk] = W @ h^T. With d = 192 the three
    lm_head GEMMs are thin, and MKL runs the vocab-major forms (W @ h^T, P @ h, P^T @ W) ~1.3x faster on this CPU
    than the token-major ones. The softmax is written out as five in-place passes (max, sub, exp, sum, scale) over
    the one buffer: torch's fused log_softmax over dim 0 is 4x slower, and logsumexp allocates temporaries.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, workspace: torch.Tensor | None = None,
                grad_enabled: bool = True):
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        scale = valid.float() / n_valid  # d(mean loss)/d(token loss); 0 for ignored tokens
        safe_targets = targets.clamp(min=0)
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
            if workspace is not None:  # [V, c] view of the caller's reused buffer
                logits = torch.mm(weight, hc.t(), out=workspace[:weight.shape[0] * hc.shape[0]].view(-1, hc.shape[0]))
            else:
                logits = (weight.to(h.dtype) @ hc.t()).float()  # [V, c]
            target_logit = logits.gather(0, tc).squeeze(0)
            peak = logits.amax(0)
            # exp(z - peak) in place, in row blocks of ~4 MB that stay in cache while they are shifted,
            # exponentiated and summed: one pass over the [V, c] buffer from memory instead of three
            sums = torch.zeros_like(peak)
            rows = max(1, (1 << 20) // logits.shape[1])
            for block in logits.split(rows):
                sums += block.sub_(peak).exp_().sum(0)
            total += ((peak + sums.log() - target_logit) * sc).sum()
            if needs_grad:
                # d loss / d z = (exp(z - peak) / sums - onehot) * scale. The per-token factor scale / sums goes into
                # the small [c, d] operands of the GEMMs, not over the [V, c] buffer: (E diag(f)) h = E (diag(f) h);
                # the one-hot term touches only the target rows.
                f = (sc / sums).unsqueeze(1)  # [c, 1]
                hf = hc.float()
                grad_h[start:start + chunk_size] = ((logits.t().to(h.dtype) @ weight.to(h.dtype)) * f
                                                    - sc.unsqueeze(1) * weight[tc[0]].to(h.dtype))
                if start == 0:
                    torch.mm(logits, hf * f, out=grad_w)
                else:
                    grad_w.addmm_(logits, hf * f)
                grad_w.index_add_(0, tc[0], hf * -sc.unsqueeze(1))
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # in place: a copy of grad_w would be another 37 MB allocation (the version counter still stops a second
        # backward through the same graph from reusing the scaled tensors)
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None, None, None


class ChunkedCrossEntropy:
    """loss = ChunkedCrossEntropy()(h [N, d], weight [V, d], targets [N]) -> mean loss over targets != -100.

    On CPU the [V, chunk] fp32 logits live in one buffer kept between calls: glibc hands a freed block this large
    (100 MB for 512 tokens) back to the OS, so a fresh one per step page-faults back in, which made the first lm_head
    GEMM 2x slower (130 vs 65 ms). CUDA's caching allocator already reuses its blocks."""

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size
        self._buffer = None

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        workspace = self._workspace(h, weight, min(h.shape[0], self.chunk_size))
        return LinearCrossEntropy.apply(h, weight, targets, self.chunk_size, workspace, torch.is_grad_enabled())

    def _workspace(self, h: torch.Tensor, weight: torch.Tensor, columns: int) -> torch.Tensor | None:
        if not (h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32):
            return None
        needed = weight.shape[0] * columns
        if self._buffer is None or self._buffer.numel() < needed:
            self._buffer = torch.empty(needed)
        return self._buffer
