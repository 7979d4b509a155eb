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


@pytest.mark.parametrize("kl_weight", [0.0, 0.3, 1.0])
def test_distillation_loss_and_gradients_match_cross_entropy_plus_kl(kl_weight):
    """(1 - w) CE + w KL(teacher || student), chunked, against torch's log_softmax written out; ignored tokens count
    in neither term; the teacher's logits come from its own hidden states and lm_head (another width)."""
    from loss import ChunkedCrossEntropy, SoftTargets

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    teacher = SoftTargets(torch.randn(37, 12) * 2, torch.randn(101, 12), kl_weight)
    targets = torch.randint(0, 101, (37,))
    targets[[3, 10]] = -100
    loss = ChunkedCrossEntropy(chunk_size=8)(h, weight, targets, teacher)
    loss.backward()
    grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    log_q = torch.log_softmax(h @ weight.t(), -1)
    log_p = torch.log_softmax(teacher.hidden @ teacher.weight.t(), -1)
    keep = targets != -100
    ce = torch.nn.functional.nll_loss(log_q[keep], targets[keep])
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[keep].mean()
    ref = (1 - kl_weight) * ce + kl_weight * kl
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(grads[0], h.grad, atol=1e-6) and torch.allclose(grads[1], weight.grad, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        ChunkedCrossEntropy()(h, weight, targets, SoftTargets(teacher.hidden[:5], teacher.weight, 0.5))
