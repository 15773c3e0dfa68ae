"""Frozen attention: replaying one recorded pattern over many copies of the prompt."""

from __future__ import annotations

import torch

from vlmscope.attribution.freeze import _mix


def test_one_pattern_mixes_every_copy_like_a_broadcast_matmul() -> None:
    gen = torch.Generator().manual_seed(0)
    pattern = torch.softmax(torch.randn(1, 3, 5, 7, generator=gen), -1)
    v = torch.randn(4, 3, 7, 2, generator=gen, requires_grad=True)
    want = torch.matmul(pattern.expand(4, -1, -1, -1), v)
    got = _mix(pattern, v)
    torch.testing.assert_close(got, want)
    g = torch.randn(got.shape, generator=gen)
    (grad_got,) = torch.autograd.grad(got, v, g)
    (grad_want,) = torch.autograd.grad(want, v, g)
    torch.testing.assert_close(grad_got, grad_want)
