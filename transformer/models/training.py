"""Reusable training pieces from "Attention Is All You Need": label-smoothed cross-entropy (section 5.4) and
the inverse-square-root warm-up learning-rate schedule (section 5.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["label_smoothed_cross_entropy", "inverse_sqrt_lr", "InverseSqrtSchedule"]


def label_smoothed_cross_entropy(logits, target, smoothing=0.1, ignore_index=-100):
    """Mean over non-ignored positions of (1 - eps) * NLL(target) + eps * mean_v(-log p_v).

    logits [..., V] (any float dtype; computed in fp32), target [...] int64. Returns (loss, n_tokens).
    """
    if not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be a float in [0, 1), got {smoothing!r}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} (logits without the vocab dim), "
                         f"got {tuple(target.shape)}")
    logp = F.log_softmax(logits.float(), dim=-1)
    keep = target != ignore_index
    safe = target.masked_fill(~keep, 0)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(dim=-1)
    per_tok = (1.0 - smoothing) * nll + smoothing * smooth
    n = keep.sum()
    return (per_tok * keep).sum() / n.clamp(min=1), n


def inverse_sqrt_lr(step, d_model, warmup_steps=4000, factor=1.0):
    """lrate = factor * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), step counted from 1."""
    step = max(int(step), 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup_steps ** -1.5)


class InverseSqrtSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets every parameter group's lr to inverse_sqrt_lr(step) (the optimizer's own lr is ignored)."""

    def __init__(self, optimizer, d_model, warmup_steps=4000, factor=1.0, last_epoch=-1):
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be an int >= 1, got {d_model!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.d_model, self.warmup_steps, self.factor = d_model, warmup_steps, factor
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        lr = inverse_sqrt_lr(self.last_epoch + 1, self.d_model, self.warmup_steps, self.factor)
        return [lr for _ in self.optimizer.param_groups]
