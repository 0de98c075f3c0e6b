"""Each hand-written kernel computes what the plain PyTorch ops compute, in value and in gradient (float64,
so any difference is a bug, not rounding); and the model selects them only where they apply."""

import pytest
import torch
import torch.nn.functional as F

from nanochat import gpt, kernels


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def assert_same_value_and_gradient(fused, plain, inputs, seed=1):
    """fused(*inputs) == plain(*inputs), and so are the gradients of a random weighting of the outputs."""
    got, expected = fused(*inputs), plain(*inputs)
    assert torch.allclose(got, expected, atol=1e-12)
    weights = torch.randn(expected.shape, dtype=expected.dtype, generator=torch.Generator().manual_seed(seed))
    grads_got = torch.autograd.grad((got * weights).sum(), inputs)
    grads_expected = torch.autograd.grad((expected * weights).sum(), inputs)
    for a, b in zip(grads_got, grads_expected):
        assert torch.allclose(a, b, atol=1e-12)


def test_rms_norm_kernel_matches_f_rms_norm():
    x = rand(3, 5, 16)
    assert_same_value_and_gradient(lambda x: kernels.RMSNormCPU.apply(x, 1e-6),
                                   lambda x: F.rms_norm(x, (16,), eps=1e-6), (x,))


def rotate_half_reference(x, cos, sin):
    d = x.size(-1) // 2
    return x * cos + torch.cat((-x[..., d:], x[..., :d]), dim=-1) * sin


def test_rotary_kernel_matches_the_rotate_half_formula_and_its_inverse_undoes_it():
    x = rand(2, 7, 3, 8)
    angles = torch.rand(1, 7, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 6
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    assert_same_value_and_gradient(lambda x: kernels.RotaryFn.apply(x, cos, sin),
                                   lambda x: rotate_half_reference(x, cos, sin), (x,))
    with torch.no_grad():
        back = kernels.rotate(kernels.rotate(x, cos, sin), cos, sin, inverse=True)
    assert torch.allclose(back, x, atol=1e-12)


def test_relu_squared_kernel_matches_relu_then_square():
    x = rand(4, 33)
    assert_same_value_and_gradient(kernels.ReluSquaredFn.apply, lambda x: F.relu(x).square(), (x,))


def test_fused_softcap_cross_entropy_matches_autograd():
    n = kernels.SoftcapCrossEntropyCPU.CHUNK * 2 + 37  # several row chunks, the last one partial
    x, W = rand(n, 16, seed=3), rand(50, 16, seed=4)
    targets = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(5))
    targets[::7] = -1

    def plain(x, W):
        logits = 15 * torch.tanh(F.linear(x, W) / 15)
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction="none")
    assert_same_value_and_gradient(lambda x, W: kernels.SoftcapCrossEntropyCPU.apply(x, W, targets, 15.0),
                                   plain, (x, W))


def test_fused_cross_entropy_refuses_a_second_backward():
    x, W = rand(4, 8), rand(10, 8)
    loss = kernels.SoftcapCrossEntropyCPU.apply(x, W, torch.tensor([1, 2, 3, -1]), 15.0).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_the_model_uses_the_fused_loss_only_for_fp32_on_cpu_with_a_softcap_it_supports():
    x = torch.zeros(2, 3)
    assert gpt.use_fused_head_loss(x, 15.0)
    assert not gpt.use_fused_head_loss(x, 0.0)  # no soft-capping: the plain loss
    assert not gpt.use_fused_head_loss(x, kernels.SoftcapCrossEntropyCPU.MAX_SOFTCAP + 1)
    assert not gpt.use_fused_head_loss(x.to(torch.bfloat16), 15.0)
