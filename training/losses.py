"""What CoDe's specialized fine-tuning trains: which positions each role runs and scores, and the
distillation loss (cross-entropy on the true tokens, KL to a frozen teacher's logits)."""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

ROLES = ('drafter', 'refiner', 'all')


class Positions(NamedTuple):
    num_scales: int  # the forward runs scales 0..num_scales-1
    begin: int       # the loss covers positions [begin, end)
    end: int


def role_positions(role: str, draft_steps: int, begin_ends) -> Positions:
    """drafter: scales 0..N-1, and the forward stops there; refiner: the forward runs every scale,
    the loss covers N..; all: every scale (the refiner's first stage)."""
    S = len(begin_ends)
    if role == 'drafter':
        return Positions(draft_steps, 0, begin_ends[draft_steps - 1][1])
    if role == 'refiner':
        return Positions(S, begin_ends[draft_steps][0], begin_ends[-1][1])
    return Positions(S, 0, begin_ends[-1][1])


class Loss(NamedTuple):
    loss: torch.Tensor
    ce: torch.Tensor
    kd: Optional[torch.Tensor]


def distillation_loss(student_NV, targets_N, teacher_NV=None, alpha=0.5, T=1.0, label_smooth=0.0) -> Loss:
    """Rows N = every (image, position) trained. CE averaged over rows; with a teacher,
    KD = T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over the vocabulary and
    averaged over rows, and loss = alpha * KD + (1 - alpha) * CE."""
    student_NV = student_NV.float()
    ce = F.cross_entropy(student_NV, targets_N, label_smoothing=label_smooth)
    if teacher_NV is None:
        return Loss(ce, ce, None)
    kd = F.kl_div(F.log_softmax(student_NV / T, dim=-1), F.log_softmax(teacher_NV.float() / T, dim=-1),
                  log_target=True, reduction='sum') * (T * T / student_NV.shape[0])
    return Loss(alpha * kd + (1 - alpha) * ce, ce, kd)
