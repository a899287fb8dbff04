"""The GPU path without a GPU: the CUDA code runs on fake tensors (PyTorch's FakeTensorMode: a device, a
shape and a dtype, no data), at real sizes, on any machine; a tracker adds up the CUDA memory it holds.

fake_cuda() is the context: tensors made on 'cuda' inside it are fake, and the few places where PyTorch
asks the driver are answered as a GPU would (see its docstring). Inside it a run checks what a GPU run
needs: a CPU tensor mixed into a CUDA computation raises as on a GPU, and so do anything that reads a
value on the host (.item(), nonzero, boolean indexing, .numpy()) and most dtype mismatches; gpu_checks()
also refuses a device-to-host copy (.cpu()) and a matrix product of mixed dtypes, as a GPU would.

MemoryTracker counts every CUDA storage from its creation to its release, rounded up as the caching
allocator rounds (512 bytes), by kind (parameters, KV cache, the rest). What it leaves out, and a GPU
adds: see LEFT_OUT.
"""
import contextlib
import weakref
from types import SimpleNamespace
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from models import generate
from models.var import GrowingKVCache, KVCache
from models.vqvae import DECODE_CHUNK

GB = 1e9
LEFT_OUT = ('the caching allocator\'s fragmentation and reserved-but-free blocks, cuBLAS/cuDNN workspaces, '
            'the buffers kernels allocate internally (top-k, sort), the CUDA context (about 0.5 GB per process, '
            'not in max_memory_allocated either) and NCCL buffers')


class HostSync(RuntimeError):
    """A device-to-host copy inside gpu_checks()."""


class _HostGenerator(torch.Generator):
    """Stands in for torch.Generator while simulating: a CUDA generator needs the driver. The fake random
    ops draw nothing, so which generator is passed does not matter (_FakeRandom passes None)."""

    def __new__(cls, device='cpu'):
        return super().__new__(cls, 'cpu')


class _FakeRandom(TorchDispatchMode):
    """Random ops on fake tensors refuse a generator (their reference kernels take none): pass None."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get('generator') is not None:
            kwargs = dict(kwargs, generator=None)
        return func(*args, **kwargs)


_SDPA, _NORMALIZE = F.scaled_dot_product_attention, F.normalize


def _attention_as_on_gpu(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention with the kernel a GPU picks. Without a driver PyTorch cannot query
    the GPU for its fused kernels and takes the math kernel, which holds the whole attention matrix in
    fp32; a GPU runs flash attention (half precision, no mask) or the memory-efficient kernel (a mask, or
    fp32), which hold only the output and the log-sum-exp. 4-D inputs are routed to those kernels as
    PyTorch's own selection routes them on an H100; 3-D inputs (the VQVAE's) take the math kernel there too."""
    if q.dim() != 4 or dropout_p or is_causal or enable_gqa or q.shape[-1] % 8:
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    device = q.device.type
    if torch.is_autocast_enabled(device):  # F.scaled_dot_product_attention is an autocast op; the kernels are not
        half = torch.get_autocast_dtype(device)
        q, k, v = q.to(half), k.to(half), v.to(half)
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype and q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # as PyTorch converts it: 0 where allowed, -inf elsewhere
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, -torch.inf)
    bias = None if attn_mask is None else attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, grad, scale=scale)[0]


def _normalize_as_on_cuda(x, p=2.0, dim=1, eps=1e-12, out=None):
    """F.normalize as CUDA's autocast runs it on half-precision input: the norm in fp32 (CPU autocast
    leaves it in half precision). Every other op of the model has the same autocast policy on both
    devices: tests/test_gpu_path_finetune.py compares the dtypes of a forward's ops on fake CUDA and fake CPU."""
    if not torch.is_autocast_enabled(x.device.type) or x.dtype not in (torch.float16, torch.bfloat16) or out is not None:
        return _NORMALIZE(x, p, dim, eps, out)
    return x / torch.linalg.vector_norm(x, p, dim, keepdim=True, dtype=torch.float32).clamp_min(eps).expand_as(x)


@contextlib.contextmanager
def fake_cuda():
    """Tensors made on 'cuda' in here are fake CUDA tensors, on a machine with or without a GPU.

    Where PyTorch would ask the driver, the answers are a GPU's: torch.cuda.is_available() and
    is_bf16_supported() say True (autocast('cuda') switches itself off otherwise), torch.Generator
    makes a host generator whatever device is asked, and attention takes the kernels a GPU picks
    (_attention_as_on_gpu; patched where the models call it, so that a recomputation in backward takes
    them too). Only for simulating: nothing real is computed in here.
    Autograd cannot run backward on fake CUDA tensors without a driver (torch 2.14's engine asks it about
    the device, hasPrimaryContext): fake_cpu() serves training."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(FakeTensorMode())  # first: made while CUDA is said to be there, it would ask the driver
        stack.enter_context(mock.patch.object(torch.cuda, 'is_available', lambda: True))
        stack.enter_context(mock.patch.object(torch.cuda, 'is_bf16_supported', lambda *a, **k: True))
        stack.enter_context(mock.patch.object(torch, 'Generator', _HostGenerator))
        stack.enter_context(_FakeRandom())
        stack.enter_context(mock.patch.object(F, 'scaled_dot_product_attention', _attention_as_on_gpu))
        yield


@contextlib.contextmanager
def fake_cpu():
    """Fake CPU tensors with CUDA's choices (kernels, the one autocast rule where the CPU differs): the
    fine-tuning step runs here, since autograd's engine can run backward on fake CPU tensors only."""
    with FakeTensorMode(), _FakeRandom(), mock.patch.object(F, 'scaled_dot_product_attention', _attention_as_on_gpu), \
            mock.patch.object(F, 'normalize', _normalize_as_on_cuda):
        yield


class gpu_checks(TorchDispatchMode):
    """What a GPU run refuses, or pays for, and fake tensors let pass: a copy from the GPU to the host (HostSync:
    in the sampling loop each one stalls the GPU's queue; reading a value, .item() or nonzero, raises on fake
    tensors anyway), and a matrix product of mixed dtypes (cuBLAS refuses it; the fake kernels of mm, addmm
    and linear do not check)."""

    aten = torch.ops.aten
    COPIES = (aten._to_copy, aten.to, aten.copy_, aten._copy_from, aten._copy_from_and_resize)  # all overloads: under inference_mode .cpu() is aten.to
    PRODUCTS = (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_, aten.addbmm, aten.mv, aten.addmv, aten.dot)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.PRODUCTS:
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            if len(dtypes) > 1:
                raise TypeError(f'{func}: operands of dtypes {sorted(map(str, dtypes))}, which a GPU refuses')
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.COPIES:
            on = lambda tree, device: any(isinstance(t, torch.Tensor) and t.device.type == device for t in tree_flatten(tree)[0])
            if on((args, kwargs), 'cuda') and on(out, 'cpu'):
                raise HostSync(f'{func}: a copy from the GPU to the host')
        return out


class MemoryTracker(TorchDispatchMode):
    """Bytes of CUDA storage alive, by kind, from each storage's creation to its release; the peak of
    the total and the split at that moment. Storages already alive count once given to track()."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.now, self.peak, self.at_peak = {}, 0, {}
        self.kind = 'rest'

    def track(self, tensors, kind):
        for t in tensors:
            self._add(t, kind)
        self._update_peak()

    @contextlib.contextmanager
    def counting_as(self, kind):
        """Storages created in here count as kind."""
        previous, self.kind = self.kind, kind
        try:
            yield
        finally:
            self.kind = previous

    def _add(self, t, kind=None):
        if t.device.type != 'cuda':
            return
        st = t.untyped_storage()
        if st in self.live:
            return
        n = -(-st.nbytes() // 512) * 512  # the caching allocator's block size
        kind = kind or self.kind
        self.now[kind] = self.now.get(kind, 0) + n

        def release(_, kind=kind, n=n):
            self.now[kind] -= n
        self.live[st] = weakref.ref(st, release)

    def _update_peak(self):
        total = sum(self.now.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        self._update_peak()
        return out


def _counted_as(tracker, kind, method):
    def wrapped(*args, **kwargs):
        with tracker.counting_as(kind):
            return method(*args, **kwargs)
    return wrapped


def split(tracker, at_peak=True):
    """{'params', 'kv_cache', 'rest', 'total'} in bytes, at the peak or now."""
    parts = tracker.at_peak if at_peak else tracker.now
    out = dict(params=parts.get('params', 0), kv_cache=parts.get('kv', 0))
    out['rest'] = sum(parts.values()) - out['params'] - out['kv_cache']
    out['total'] = sum(parts.values())
    return out


def sampling_memory(schedule, vae, B, dtype, fast=True, decode_chunk=DECODE_CHUNK, **sampling):
    """Peak CUDA memory of generate() for B images, and of generate() plus the VQVAE decode, on the fake
    models of schedule and vae (built inside fake_cuda()); call inside fake_cuda(). Returns
    (sampling split, sampling + decode split) as split() gives them. fast=False runs the reference's
    computation (its growing cache counts as the KV cache). decode_chunk: VQVAE.decode's (None: all at once)."""
    tracker = MemoryTracker()
    models = {id(m): m for m in [vae] + [stage.model for stage in schedule]}.values()
    tracker.track([t for m in models for t in list(m.parameters()) + list(m.buffers())], 'params')
    labels = torch.arange(B, device='cuda') % schedule[0].model.num_classes
    sampling = dict(dict(seed=0, cfg=1.5, top_k=600, top_p=0.96, temp=1.0), **sampling)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(KVCache, '__init__', _counted_as(tracker, 'kv', KVCache.__init__)))
        stack.enter_context(mock.patch.object(GrowingKVCache, 'update', _counted_as(tracker, 'kv', GrowingKVCache.update)))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32))
        stack.enter_context(tracker)
        _, f_hat = generate(schedule, vae, labels, fast=fast, **sampling)
        sampled = split(tracker)
        vae.decode(f_hat, chunk=decode_chunk)
    return sampled, split(tracker)


def finetune_memory(role, draft_steps, batch, world, fsdp, grad_ckpt, student, teacher, vae, dtype=torch.bfloat16, steps=2):
    """Peak memory of one process of a fine-tuning run at a per-GPU batch, on fake CPU tensors (see
    fake_cpu()): forward, backward, gradient clipping and the AdamW step, `steps` times (the second has
    the optimizer state). student, teacher (or None) and vae: models built inside fake_cpu(), the student
    in fp32 with gradients. FSDP2 runs over a fake process group of `world` processes (torch's FakeStore)
    and torch's FSDPMemTracker counts it; DDP is one process's step with the gradients held throughout,
    as DDP's buckets hold them (gradient_as_bucket_view), counted by torch's MemTracker; DDP's memory
    does not depend on the number of processes. Returns bytes: {weights, gathered, grads, optimizer,
    frozen (teacher and VQVAE, counted from their sizes), activations, total}."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from training.losses import role_positions
    from training.loop import step_loss, wrap
    from training.schedule import param_groups

    args = SimpleNamespace(fsdp=fsdp, grad_ckpt=grad_ckpt, alpha=0.5, kd_temp=1.0, label_smooth=0.0)
    frozen = sum(t.numel() * t.element_size() for m in (teacher, vae) if m is not None for t in m.parameters())
    if fsdp:
        with unset_fake_temporarily():  # the process group and the device mesh hold real (tiny) tensors
            dist.init_process_group('fake', rank=0, world_size=world, store=FakeStore())
    try:
        if fsdp:
            with unset_fake_temporarily():
                model = wrap(student, args, world, torch.device('cpu'))
        else:
            model = student  # one process's step; zero_grad(set_to_none=False) keeps the gradients, as DDP's buckets do
        # fused, as on a GPU; under FSDP2 the single-tensor loop, which holds what the fused kernel holds (one
        # parameter's temporaries): fused AdamW on fake CPU DTensors gathers the full tensors, which a GPU does not
        optimizer = torch.optim.AdamW(param_groups(student, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=not fsdp, foreach=False)
        positions = role_positions(role, draft_steps, student.begin_ends)
        labels = torch.zeros(batch, dtype=torch.long)
        tokens = torch.zeros(batch, student.L, dtype=torch.long)
        inputs = vae.quantize.teacher_inputs(tokens)
        tracker = FSDPMemTracker(mod=model, optm=optimizer) if fsdp else MemTracker()
        if not fsdp:
            if teacher is not None:  # MemTracker hooks every parameter it meets; the teacher runs under no_grad all the same
                teacher.requires_grad_(True)
            tracker.track_external(model, optimizer, *(m for m in (teacher, vae) if m is not None))
        autocast = torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32)
        with tracker:
            for _ in range(steps):
                out = step_loss(model, teacher, labels, tokens, inputs, positions, args, autocast)
                out.loss.backward()
                del out
                torch.nn.utils.clip_grad_norm_(student.parameters(), 2.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=fsdp)  # the second step's peak has the gradients of the first
                tracker.reset_mod_stats()
        peak = {str(k).split('.')[-1]: v for k, v in next(iter(tracker.get_tracker_snapshot('peak').values())).items()}
    finally:
        if fsdp:
            dist.destroy_process_group()
    get = lambda *names: sum(peak.get(n, 0) for n in names)
    parts = dict(weights=get('PARAM', 'SHARDED_PARAM', 'BUFFER') - (0 if fsdp else frozen),
                 gathered=get('UNSHARDED_PARAM', 'ALL_GATHER'),
                 grads=get('GRAD', 'SHARDED_GRAD', 'UNSHARDED_GRAD', 'REDUCE_SCATTER'),
                 optimizer=get('OPT'), frozen=frozen,
                 activations=get('ACT', 'TEMP', 'INP', 'OTH'))
    parts['total'] = sum(parts.values())
    assert abs(parts['total'] - get('Total') - (frozen if fsdp else 0)) < 1e6, (parts, peak)
    return parts
