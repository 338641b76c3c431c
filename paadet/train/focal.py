"""The classification loss of PAA in few passes: the weighted sum of the sigmoid focal loss over every anchor and class.

mmdetection's ``py_sigmoid_focal_loss`` (:func:`paadet.train.reassign.sigmoid_focal_loss`) builds the
one-hot target and makes about ten passes over the ``[A, C]`` logits (3.6 M elements for a batch of two
1333x800 images and 80 classes), and autograd about as many more backwards; that was ~70 % of
:class:`~paadet.train.loss.PAALoss`'s time on a CPU. The target is one-hot, so the sum splits into

* every element as a negative: ``(1 - alpha) * p^gamma * softplus(x)`` (``p = sigmoid(x)``;
  ``softplus(x) = -log(1 - p)`` is BCE-with-logits against 0), and
* a correction at the ``Q`` positive elements (one per foreground anchor):
  ``alpha * (1 - p)^gamma * softplus(-x)`` minus the negative term there.

:class:`FocalLossSum` computes that sum with four passes forward and keeps ``p`` and ``softplus(x)``
for a closed-form backward (about five passes):

* ``d/dx`` of the negative term: ``(1 - alpha) p^gamma (gamma (1 - p) softplus(x) + p)``;
* ``d/dx`` of the positive term: ``-alpha (1 - p)^gamma (gamma p softplus(-x) + 1 - p)``.

The result equals mmdetection's formula up to float32 rounding (the sum is taken in another order;
``softplus`` and BCE-with-logits are the same function written two ways): relative differences of
about 1e-7, checked against it, gradients included, in ``tests/test_focal.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["FocalLossSum", "focal_loss_sum"]


def _pow(value: Tensor, gamma: float) -> Tensor:
    return value.square() if gamma == 2.0 else value.pow(gamma)


class FocalLossSum(torch.autograd.Function):
    """``sum_a weights[a] * sum_c focal(logits[a, c], onehot(labels[a])[c])``; a scalar (see the module docstring).

    Gradients flow to ``logits`` only (``labels`` and ``weights`` are targets).
    """

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, labels: Tensor, weights: Tensor, alpha: float, gamma: float, positives: Tensor | None
    ) -> Tensor:
        num_classes = logits.shape[1]
        prob = logits.sigmoid()
        soft = F.softplus(logits)
        neg = _pow(prob, gamma).mul_(soft)  # (1 - alpha) applied once, on the sum
        # per anchor, then weighted (one pass over [A, C]; float32 sums of 80, then of A: as accurate as a plain sum)
        total = (1 - alpha) * (neg.sum(1) * weights).sum()
        pos = positives if positives is not None else torch.nonzero(labels < num_classes).squeeze(1)  # (a host sync)
        cls = labels[pos]
        x, p, sp = logits[pos, cls], prob[pos, cls], soft[pos, cls]
        w = weights[pos]
        neg_at_pos = (1 - alpha) * _pow(p, gamma) * sp
        pos_term = alpha * _pow(1 - p, gamma) * F.softplus(-x)
        total = total + ((pos_term - neg_at_pos) * w).sum()
        ctx.save_for_backward(prob, soft, weights, pos, cls, x)
        ctx.alpha, ctx.gamma = alpha, gamma
        return total

    @staticmethod
    @once_differentiable  # the saved p and softplus are outside the graph: no double backward
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        prob, soft, weights, pos, cls, x = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        scale = (grad_out * (1 - alpha)) * weights  # [A]
        # negatives everywhere: (1 - alpha) p^gamma (gamma (1 - p) softplus(x) + p)
        grad = torch.addcmul(prob, 1 - prob, soft, value=gamma)
        grad.mul_(_pow(prob, gamma)).mul_(scale[:, None])
        # the positives: replace the negative gradient by the positive one
        p = prob[pos, cls]
        sp_neg = F.softplus(-x)
        pos_grad = -alpha * _pow(1 - p, gamma) * (gamma * p * sp_neg + 1 - p)
        grad[pos, cls] = pos_grad * (grad_out * weights[pos])
        return grad, None, None, None, None, None


def focal_loss_sum(
    logits: Tensor,
    labels: Tensor,
    weights: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    positives: Tensor | None = None,
) -> Tensor:
    """The weighted focal-loss sum of :class:`FocalLossSum`.

    Args:
        logits: ``[A, C]`` class logits (float32).
        labels: ``[A]`` int64 class per anchor, ``C`` = background.
        weights: ``[A]`` float weight per anchor (mmdetection's label weights: 0 for invalid anchors).
        alpha, gamma: the focal loss's.
        positives: ``[Q]`` int64 indices of the anchors with ``labels < C``, when the caller knows them
            (saves a host sync); None: found here.

    Returns:
        A scalar: ``sum_a weights[a] * sum_c focal(logits[a, c], [labels[a] == c])``.
    """
    return FocalLossSum.apply(logits, labels, weights.to(logits.dtype), float(alpha), float(gamma), positives)
