"""The two pretraining losses of the paper [P Table 10]: softmax cross-entropy with label
smoothing (ImageNet-1K) and the sigmoid (binary cross-entropy) loss of ImageNet-21K/JFT
pretraining. Both accept hard labels or soft targets (mixup/cutmix) and a per-sample `valid` mask
(bad samples replaced by the data pipeline do not count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing (already-soft targets are returned as they are)."""
    if labels.ndim == 2:
        return labels
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    smoothing: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss over valid samples. `kind` is "softmax" or "sigmoid".

    The sigmoid loss sums the per-class binary cross-entropies of a sample (as big_vision's
    `sigmoid_xent`) and averages over samples.
    """
    targets = smooth_targets(labels, logits.shape[1], smoothing).to(torch.float32)
    logits = logits.float()
    if kind == "softmax":
        per_sample = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1)
    elif kind == "sigmoid":
        per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
    else:
        raise ValueError(f"loss must be softmax or sigmoid, not {kind!r}")
    if valid is None:
        return per_sample.mean()
    weights = valid.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)
