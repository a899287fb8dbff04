"""VAR's optimisation recipe (FoundationVision/VAR: utils/lr_control.py, utils/amp_sc.py, its README's
commands): the learning rate and weight decay as pure functions of the step, the weight-decay groups,
the defaults by depth, and fp16 loss scaling."""
import math

import torch

# VAR's filter_params(nowd_keys=...): parameters whose name contains one of these get no weight decay
NO_DECAY_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start', 'start_pos',
                 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')
SCHEDULES = ('lin0', 'cos')


def recipe(depth):
    """VAR's README commands by depth: d16/d20 --tblr 1e-4 --wpe 0.1; d24/d30 --tblr 8e-5 --wpe 0.01; d30 also
    --twde 0.08 (else the decay stays at --twd 0.05); drop path 0.1 * depth / 24 (models/__init__.py)."""
    deep = depth > 20
    return dict(blr=8e-5 if deep else 1e-4, wpe=0.01 if deep else 0.1, wd=0.05, wd_end=0.08 if depth >= 30 else None,
                drop_path=0.1 * depth / 24)


def lr_wd_at(step, total, peak, warmup, wp0, wpe, sched, wd, wd_end):
    """(learning rate, weight decay) at `step` of `total`: VAR's lr_wd_annealing. Warm-up from wp0 * peak
    linearly over `warmup` steps; then lin0 (flat for the first 5% of the rest, then linear down to
    wpe * peak at the last step) or cos (half cosine down to wpe * peak); the weight decay follows a
    half cosine from wd at step 0 to wd_end at the last step."""
    if step < warmup:
        f = wp0 + (1 - wp0) * step / warmup
    else:
        passed = (step - warmup) / max(1, total - 1 - warmup)  # 0 .. 1
        if sched == 'cos':
            f = wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * passed))
        else:
            f = 1.0 if passed < 0.05 else wpe + (1 - wpe) * (1 - passed) / 0.95
    w = wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * step / max(1, total - 1)))
    return f * peak, w


def param_groups(model, weight_decay):
    """VAR's filter_params: no weight decay on 1-d tensors, biases and the positions, level embedding and
    temperatures (NO_DECAY_KEYS); decay on every other matrix, the class embedding included. Each group
    carries its wd_scale; set_lr_wd applies the scheduled decay through it."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        skip = p.ndim == 1 or name.endswith('bias') or any(k in name for k in NO_DECAY_KEYS)
        (rest if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay, wd_scale=1.0), dict(params=rest, weight_decay=0.0, wd_scale=0.0)]


def set_lr_wd(optimizer, lr, wd):
    for group in optimizer.param_groups:
        group['lr'] = lr
        group['weight_decay'] = wd * group.get('wd_scale', 1.0)


class LossScaler:
    """fp16 loss scaling as VAR's GradScaler(init_scale=2**11, growth_interval=1000), its scale capped at
    2**15: halved by a non-finite step, doubled after 1,000 clean ones. Disabled (scale 1) for bf16 and
    fp32. Whether a step is clean is the caller's decision, made across every process (a sharded
    gradient's overflow shows on one process only), so the scaler only keeps the scale."""

    def __init__(self, enabled, init=2.0 ** 11, growth_interval=1000, cap=2.0 ** 15):
        self.enabled, self.growth_interval, self.cap = enabled, growth_interval, cap
        self.scale = init if enabled else 1.0
        self.clean = 0  # clean steps since the scale last changed

    def unscale_(self, params):
        if self.enabled:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / self.scale)  # a power of two: exact

    def update(self, finite):
        if not self.enabled:
            return
        if not finite:
            self.scale, self.clean = self.scale / 2, 0
        else:
            self.clean += 1
            if self.clean == self.growth_interval:
                self.scale, self.clean = self.scale * 2, 0
        self.scale = min(self.scale, self.cap)  # fp16 overflows at 65504: a larger scale only skips steps

    def state_dict(self):
        return dict(scale=torch.tensor(self.scale, dtype=torch.float64), clean=torch.tensor(self.clean))

    def load_state_dict(self, state):
        self.scale, self.clean = float(state['scale']), int(state['clean'])
