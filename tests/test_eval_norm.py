"""The eval-mode batch-norm backward equals PyTorch's, and steps aside where it would not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saliencycheck.engine.eval_norm import EvalBatchNormMode


def _bn_net(dims: int) -> nn.Module:
    torch.manual_seed(0)
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    net = nn.Sequential(conv(3, 4, 3, padding=1), bn(4), nn.ReLU(inplace=True),
                        conv(4, 4, 3, padding=1), bn(4, affine=False), nn.ReLU(),
                        nn.Flatten(), nn.LazyLinear(2))
    shape = (5, 3, 8) if dims == 1 else (5, 3, 6, 6)
    net(torch.randn(shape))  # materialise the lazy layer
    for module in net.modules():  # statistics far from (0, 1), so a wrong scale shows
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-2, 2)
            module.running_var.uniform_(0.1, 4)
            if module.affine:
                nn.init.uniform_(module.weight, -2, 2)
                nn.init.uniform_(module.bias, -1, 1)
    return net.double().eval()


def _grads(net: nn.Module, x: torch.Tensor, mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with EvalBatchNormMode() if mode else torch.enable_grad():
        out = net(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("dims", [1, 2])
def test_input_gradient_equals_pytorch(dims: int) -> None:
    net = _bn_net(dims).requires_grad_(False)
    x = torch.randn((5, 3, 8) if dims == 1 else (5, 3, 6, 6), dtype=torch.float64)
    out, grad = _grads(net, x, mode=False)
    out_mode, grad_mode = _grads(net, x, mode=True)
    assert torch.equal(out_mode, out)  # the native forward runs
    torch.testing.assert_close(grad_mode, grad, rtol=1e-12, atol=1e-12)


def test_backward_is_the_hand_formula() -> None:
    bn = nn.BatchNorm2d(3).double().eval().requires_grad_(False)
    bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
    bn.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with EvalBatchNormMode():
        (grad,) = torch.autograd.grad(bn(x), x, g)
    scale = torch.tensor([2.0 / (0.25 + 1e-5) ** 0.5, -1.0 / (4 + 1e-5) ** 0.5,
                          0.5 / (1 + 1e-5) ** 0.5], dtype=torch.float64)
    torch.testing.assert_close(grad, g * scale[:, None, None], rtol=1e-12, atol=0)


def test_parameters_that_need_gradients_keep_pytorch_backward() -> None:
    net = _bn_net(2)  # parameters require grad
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    with EvalBatchNormMode():
        net(x).sum().backward()
    bn = net[1]
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0


def test_training_mode_keeps_batch_statistics() -> None:
    net = _bn_net(2).requires_grad_(False).train()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    before = net[1].running_mean.clone()
    out, grad = _grads(net, x, mode=False)
    net[1].running_mean.copy_(before)
    out_mode, grad_mode = _grads(net, x, mode=True)
    torch.testing.assert_close(out_mode, out)
    torch.testing.assert_close(grad_mode, grad)


def test_reduced_precision_gradient_keeps_the_input_dtype() -> None:
    net = _bn_net(2).float().requires_grad_(False)
    x = torch.randn(5, 3, 6, 6, requires_grad=True)
    with EvalBatchNormMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        score = net(x).float().sum()
    (grad,) = torch.autograd.grad(score, x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
