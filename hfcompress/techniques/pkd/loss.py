"""The PKD distillation loss (Sun et al., 2019), as pure functions on tensors.

    L = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(p_teacher^T || p_student^T) + beta * L_PT

``L_PT`` (the paper's Eq. 3) is the squared distance between L2-normalised hidden states of
mapped student and teacher layers: the [CLS] position of an encoder, every unmasked token of a
causal LM. Here it is averaged over examples (tokens) and over layer pairs, so beta does not
scale with the number of layers. For regression heads (STS-B) the KD term is the squared
difference of the two predictions instead of a KL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "UNLABELLED",
    "DistillationLoss",
    "distillation_loss",
    "is_unlabelled",
    "kd_loss",
    "patient_loss",
    "regression_kd_loss",
    "task_loss",
]


UNLABELLED = -100
"""Class label of a row without one (``CrossEntropyLoss``'s ignore index); a regression row
without a score carries NaN. Such rows (:func:`hfcompress.glue.augment_glue`'s copies) get the
KD and patient terms and no task loss."""


def is_unlabelled(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the rows of ``labels`` that carry no label: NaN scores, or
    :data:`UNLABELLED` classes."""
    if labels.is_floating_point():
        return ~torch.isfinite(labels)
    return labels == UNLABELLED


@dataclass
class DistillationLoss:
    """The total loss and its terms (each unweighted, so they can be logged and compared)."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    pkd: torch.Tensor


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over examples (or tokens).

    Args:
        student_logits: ``[B, V]`` (classifier) or ``[B, T, V]`` (causal LM), any float dtype.
        teacher_logits: Same shape as ``student_logits``.
        temperature: Softmax temperature T > 0; the T^2 factor keeps gradient magnitudes
            comparable across temperatures (Hinton et al., 2015).
        mask: ``[B, T]`` of 0/1 selecting the tokens that count (causal LM); None: all.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # [B] or [B, T]
    return temperature**2 * _masked_mean(kl, mask)


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task loss of a classifier ``[B, C]`` (cross-entropy) or regressor ``[B, 1]`` (MSE)
    over the labelled rows only (see :func:`is_unlabelled`). A batch without any labelled row
    gives a zero that still carries the graph."""
    keep = ~is_unlabelled(labels)
    if not keep.any():
        return logits.sum() * 0.0
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[keep, 0].float(), labels[keep].float())
    return F.cross_entropy(logits[keep].float(), labels[keep].long())


def regression_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of student and teacher predictions ``[B, 1]`` (regression heads)."""
    return F.mse_loss(student_logits.float(), teacher_logits.float())


def patient_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    *,
    cls_only: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PKD's patient loss: mean over layer pairs of the squared L2 distance between normalised
    hidden states.

    Args:
        student_hidden: One ``[B, T, C]`` tensor per mapped student layer.
        teacher_hidden: The teacher layer's ``[B, T, C]`` for each, same order (C may differ
            only if the caller projects; here both must match).
        cls_only: Compare position 0 only ([CLS], encoders); else every token (causal LMs).
        mask: ``[B, T]`` 0/1 tokens that count when ``cls_only`` is False.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student layers but {len(teacher_hidden)} teacher layers")
    if not student_hidden:
        raise ValueError("patient_loss needs at least one mapped layer pair")
    per_layer = []
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        if cls_only:
            s, t = s[:, 0], t[:, 0]  # [B, C]
        distance = (F.normalize(s.float(), dim=-1) - F.normalize(t.float(), dim=-1)).pow(2).sum(-1)
        per_layer.append(_masked_mean(distance, None if cls_only else mask))
    return torch.stack(per_layer).mean()


def distillation_loss(
    ce: torch.Tensor, kd: torch.Tensor, pkd: torch.Tensor, *, alpha: float, beta: float
) -> DistillationLoss:
    """Combine the terms: ``(1 - alpha) * ce + alpha * kd + beta * pkd`` (``kd`` already
    carries its T^2)."""
    total = (1 - alpha) * ce + alpha * kd + beta * pkd
    return DistillationLoss(total=total, ce=ce, kd=kd, pkd=pkd)
