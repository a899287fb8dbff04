"""A fine-tuning step at real sizes without a GPU (utils/simulate.py): the forward and the loss on fake CUDA
tensors under CUDA's bf16 autocast, and the whole step (forward, backward, clipping, the fused AdamW step)
on fake CPU tensors, since autograd cannot run backward on fake CUDA tensors without a driver. The CPU
run stands for the CUDA one because, with fake_cpu()'s one emulated rule, every op of the forward runs
in the dtypes CUDA's autocast gives it (checked op by op here)."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import VAR, VQVAE
from training.losses import role_positions
from utils.simulate import fake_cpu, fake_cuda, gpu_checks
from training.loop import step_loss
from training.schedule import param_groups

BF16 = torch.bfloat16


def real_models(device, role):
    """The role's student (VAR-d30 drafter, or VAR-d16 refiner) in fp32 with gradients, its frozen VAR-d30
    teacher (refiner) and the VQVAE, on device."""
    var = lambda depth: VAR(depth=depth, embed_dim=64 * depth, num_heads=depth)
    with torch.device(device):
        student = var(30 if role == 'drafter' else 16).train()
        teacher = None if role == 'drafter' else var(30).eval().requires_grad_(False)
        vae = VQVAE().eval().requires_grad_(False)
    return student, teacher, vae


def loss_of(student, teacher, vae, role, device, grad_ckpt, heads):
    """step_loss on a batch of 2 for the role's positions (N = 8); heads collects the shapes the heads return."""
    for m in (student, teacher):
        if m is not None:
            m.head.register_forward_hook(lambda mod, i, out: heads.append((tuple(out.shape), out.dtype)))
    positions = role_positions(role, 8, student.begin_ends)
    tokens = torch.zeros(2, student.L, dtype=torch.long, device=device)
    labels = torch.tensor([3, 1000], device=device)  # a class and "no class"
    args = SimpleNamespace(grad_ckpt=grad_ckpt, alpha=0.5, kd_temp=1.0, label_smooth=0.0)
    return step_loss(student, teacher, labels, tokens, vae.quantize.teacher_inputs(tokens), positions, args,
                     torch.autocast(torch.device(device).type, dtype=BF16))


@pytest.mark.parametrize('role,grad_ckpt', [('drafter', True), ('refiner', False)])
def test_a_finetuning_step_at_real_size(role, grad_ckpt):
    # the drafter's head scores scales 1-8 (255 positions); the refiner's forward runs all 680 and its head
    # scores 9-10 (425), the teacher's the same
    trained = 255 if role == 'drafter' else 680 - 255
    heads = []
    with fake_cuda():
        student, teacher, vae = real_models('cuda', role)
        with gpu_checks():
            out = loss_of(student, teacher, vae, role, 'cuda', grad_ckpt, heads)
        assert out.loss.device.type == 'cuda' and out.loss.dtype == torch.float32 and out.loss.requires_grad
        assert (out.kd is None) == (role == 'drafter')
    assert heads == [((2, trained, 4096), BF16)] * (1 if role == 'drafter' else 2)
    with fake_cpu():
        student, teacher, vae = real_models('cpu', role)
        optimizer = torch.optim.AdamW(param_groups(student, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
        loss_of(student, teacher, vae, role, 'cpu', grad_ckpt, []).loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 2.0)
        optimizer.step()
        for p in student.parameters():
            assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == torch.float32
            assert optimizer.state[p]['exp_avg'].shape == p.shape
        assert teacher is None or all(p.grad is None for p in teacher.parameters())


class Dtypes(TorchDispatchMode):
    """(op, input dtypes, output dtypes) of every op, leaving out device queries and same-dtype copies (a move
    to the GPU, which the CPU run does not need)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        outs = [o.dtype for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        if func is not torch.ops.prim.device.default and not (func is torch.ops.aten._to_copy.default and ins == outs):
            self.ops.append((str(func), ins, outs))
        return out


def test_the_cpu_step_computes_in_the_dtypes_cuda_autocast_gives():
    """What lets the fake-CPU step stand for the CUDA one: the same ops in the same dtypes (small models: the
    policy does not depend on the size)."""
    traces = {}
    for device, fake in (('cuda', fake_cuda), ('cpu', fake_cpu)):
        with fake():
            with torch.device(device):
                student, teacher, vae = VAR(depth=1, embed_dim=64, num_heads=1).train(), None, VQVAE(ch=32)
            with Dtypes() as trace:
                loss_of(student, teacher, vae, 'refiner', device, False, [])
            traces[device] = trace.ops
    assert len(traces['cuda']) > 100 and traces['cuda'] == traces['cpu']
    assert ('aten.linalg_vector_norm.default', [BF16], [torch.float32]) in traces['cpu'], 'the norm in fp32, as on CUDA'
