"""loss.py: the chunked cross-entropy equals torch's, in value and gradients, for any chunking and loss scale."""
import pytest
import torch

from conftest import tiny_config
from model import SmolLM2DeepSeek


def test_chunked_loss_and_gradients_match_plain_cross_entropy():
    torch.manual_seed(0)
    model = SmolLM2DeepSeek(tiny_config())
    model.loss_fn.chunk_size = 7  # several chunks, the last one partial
    ids = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :3] = -100
    _, loss = model(ids, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = torch.nn.functional.cross_entropy(model(ids).view(-1, 97), targets.view(-1), ignore_index=-100)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n
    model.zero_grad()  # a scaled loss (grad accumulation divides it) scales the precomputed gradients
    (model(ids, targets)[1] * 0.25).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n] * 0.25, p.grad, atol=1e-6), n
    # evaluation (no grad, forms no gradients) on a larger batch: the reused logits buffer grows, values still right
    with torch.no_grad():
        more_ids, more_targets = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
        model.loss_fn.chunk_size = 1024
        eval_loss = model(more_ids, more_targets)[1]
        ref = torch.nn.functional.cross_entropy(model(more_ids).view(-1, 97), more_targets.view(-1))
    assert eval_loss.item() == pytest.approx(ref.item(), abs=1e-5)
