"""A non-finite gradient put in on purpose, on one process at the given steps, just before clipping
(after DDP has averaged the gradients: the other processes see finite ones).

In-process: install(patch, steps, rank). As a script, finetune_CoDe.py with it, for subprocesses and
torchrun: NONFINITE="STEP,STEP,...:RANK" python tests/nonfinite.py FLAGS...; with NONFINITE_DUMP=DIR
each process also writes the student's weights it ends with to DIR/rank{R}.pth."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import training.loop as loop  # noqa: E402


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def install(patch, steps, at_rank):
    """patch: a setattr(obj, name, value) (pytest's monkeypatch.setattr, or plain setattr)."""
    current = {}
    get, clip = loop.Batches.get, loop.clip_grad_norm

    def get_and_note(self, step):
        current['step'] = step
        return get(self, step)

    def clip_with_inf(params, max_norm):
        params = list(params)
        if current.get('step') in steps and rank() == at_rank:
            with torch.no_grad():
                # FSDP2: in this process's shard of a gradient (some shards are empty)
                next(g for g in (loop.local(p.grad) for p in params) if g.numel()).view(-1)[0] = float('inf')
        return clip(params, max_norm)

    patch(loop.Batches, 'get', get_and_note)
    patch(loop, 'clip_grad_norm', clip_with_inf)


if __name__ == '__main__':
    steps, at_rank = os.environ['NONFINITE'].split(':')
    install(setattr, {int(s) for s in steps.split(',')}, int(at_rank))
    dump = os.environ.get('NONFINITE_DUMP')
    if dump:
        full = loop.full_weights

        def full_and_dump(model):
            module = getattr(model, 'module', model)  # DDP's replica of this process
            torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, os.path.join(dump, f'rank{rank()}.pth'))
            return full(model)
        loop.full_weights = full_and_dump
    import finetune_CoDe
    from utils.cli import main_guard
    sys.argv[0] = finetune_CoDe.__file__
    main_guard(finetune_CoDe.main)
