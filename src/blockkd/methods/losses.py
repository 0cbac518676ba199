"""Loss functions shared by the methods (pure functions of logits, easy to test by hand)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_div(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(target/T) || softmax(student/T)) · T², averaged over the batch (Hinton et al.).

    Computed in float32 whatever the autocast dtype: softmax of large logits in bf16 is too coarse.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(target_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target)


def dkd_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022): (TCKD, NCKD), each KL · T², batch-averaged."""
    tckd, nckd = dkd_per_sample(student_logits, teacher_logits, target, float(temperature))
    return tckd.mean(), nckd.mean()


def dkd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                   temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of each sample, each KL · T² (shape (B,)); ``temperature`` a number or a tensor that
    broadcasts to (B, 1) (CTKD's learned temperatures, which must keep their gradient).

    TCKD compares the binary (target vs. all others) distributions; NCKD compares the distributions
    over the non-target classes only. Done in log space with the target class masked to -inf,
    which is the exact form of mdistiller's ``- 1000 * gt_mask`` trick.
    """
    t = temperature
    s = student_logits.float() / t
    te = teacher_logits.float() / t
    gt = F.one_hot(target, s.shape[1]).bool()

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(z, dim=1)
        log_p_gt = log_p.masked_fill(~gt, float("-inf")).logsumexp(1)
        log_p_other = log_p.masked_fill(gt, float("-inf")).logsumexp(1)
        return torch.stack([log_p_gt, log_p_other], dim=1)

    log_bs, log_bt = binary_log_probs(s), binary_log_probs(te)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1)
    neg = torch.finfo(s.dtype).min
    log_q_s = F.log_softmax(s.masked_fill(gt, neg), dim=1)
    q_t = F.softmax(te.masked_fill(gt, neg), dim=1)
    # 0 · log 0 terms (the masked target class) must contribute exactly 0.
    nckd = (q_t * (torch.log(q_t.clamp_min(1e-30)) - log_q_s)).masked_fill(gt, 0.0).sum(1)
    t2 = (t * t).reshape(-1) if torch.is_tensor(t) else t * t
    return tckd * t2, nckd * t2


def linear_warmup(epoch: float, epochs: float) -> float:
    """min(epoch / epochs, 1): the factor of a loss term that ramps in over ``epochs`` (0: always 1)."""
    return 1.0 if epochs <= 0 else min(float(epoch) / epochs, 1.0)
