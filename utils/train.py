"""CoDe's specialized fine-tuning: the loop behind finetune_CoDe.py.

Everything a step does is a function of (settings, step): the batch is a slice of a per-epoch
permutation seeded by --seed, the "no class" rows come from a generator seeded by (--seed, step),
and the learning rate is a pure function of the step. The resumable state is therefore the
weights, the optimizer and the step; a rerun continues exactly where the saved state stopped.
"""
import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from . import distributed, timing
from .checkpoints import load_vae, load_var, save_var, var_path, vae_path, weights_digest
from .cli import check_folder_writable
from .errors import UserError
from .io import atomic_path, check_same_settings, save_json
from .losses import ROLES, distillation_loss, role_positions
from .train_data import token_cache

# flags that change only what is logged or how fast, not the weights a run ends with
NOT_SETTINGS = {'max_steps', 'save_every', 'val_data', 'val_every', 'output_dir', 'token_cache', 'workers',
                'encode_batch_size', 'fsdp', 'grad_ckpt'}
HUB_STUDENT = {'drafter': 30, 'refiner': 16, 'all': 16}
HUB_TEACHER = {'drafter': None, 'refiner': 30, 'all': 30}


def lr_at(step, peak, min_lr, warmup, total):
    """Linear warm-up to peak over `warmup` steps, then cosine down to min_lr at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay):
    """Weight decay on matrices only: not on biases, norms, embeddings, positions or temperatures."""
    embeddings = {n + '.weight' for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and name not in embeddings else rest).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def batch_rows(step, batch_size, n, seed):
    """The dataset rows of global batch `step`: consecutive slices of one permutation per epoch."""
    first = step * batch_size
    rows = []
    for i in range(first, first + batch_size):
        epoch, pos = divmod(i, n)
        if not rows or epoch != rows[-1][0]:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).numpy()
            rows.append((epoch, perm, []))
        rows[-1][2].append(pos)
    return np.concatenate([perm[np.asarray(p)] for _, perm, p in rows])


def dropped(step, batch_size, seed, rate):
    """Which rows of global batch `step` get the "no class" label (VAR's class dropout)."""
    g = torch.Generator().manual_seed(seed * 1000003 + 7 + step * 2)
    return torch.rand(batch_size, generator=g).numpy() < rate


def settings_of(args, student, teacher, vae):
    """What the trained weights depend on: the flags, the data folder and the models' content (not
    where their files lie, so that a rerun may find them elsewhere, as sample_CoDe.py's manifest)."""
    s = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS | {'student_ckpt', 'teacher_ckpt', 'vae_ckpt'}}
    s['data'] = os.path.abspath(args.data)
    s.update(student=weights_digest(student), teacher=teacher and weights_digest(teacher), vae=weights_digest(vae))
    return s


def check_args(args, world):
    if args.role not in ROLES:
        raise UserError(f'--role must be one of {", ".join(ROLES)}')
    if args.role != 'all' and not 1 <= args.draft_steps <= 9:
        raise UserError(f'--draft_steps must be in 1-9 for --role {args.role}, got {args.draft_steps}')
    if not 0 <= args.alpha <= 1:
        raise UserError(f'--alpha must be in [0, 1], got {args.alpha}')
    for flag in ('lr', 'kd_temp', 'batch_size', 'total_steps', 'grad_accum', 'save_every', 'val_every'):
        if getattr(args, flag) <= 0:
            raise UserError(f'--{flag} must be > 0, got {getattr(args, flag)}')
    for flag in ('min_lr', 'wd', 'warmup_steps', 'grad_clip', 'label_smooth', 'cond_drop'):
        if getattr(args, flag) < 0:
            raise UserError(f'--{flag} must be >= 0, got {getattr(args, flag)}')
    if args.label_smooth >= 1 or args.cond_drop > 1:
        raise UserError('--label_smooth must be < 1 and --cond_drop <= 1')
    if args.max_steps is not None and args.max_steps < 0:
        raise UserError(f'--max_steps must be >= 0, got {args.max_steps}')
    if args.batch_size % world:
        raise UserError(f'--batch_size {args.batch_size} is not divisible by the {world} processes')
    if (args.batch_size // world) % args.grad_accum:
        raise UserError(f'the per-process batch {args.batch_size // world} is not divisible by --grad_accum {args.grad_accum}')


def prepare_output(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'--output_dir {folder}: cannot create it ({e.strerror})') from None
    check_folder_writable(folder, f'--output_dir {folder}')


def check_settings(folder, settings):
    """A rerun in the same folder must be the same run (only --max_steps and the logging flags may change)."""
    return check_same_settings(os.path.join(folder, 'settings.json'), settings, folder,
                               'use another --output_dir or the same settings')


def load_models(args, device):
    student = load_var(var_path(args.student_ckpt, HUB_STUDENT[args.role], '--student_ckpt'), device)
    teacher = None
    if args.teacher_ckpt != 'none' and (args.teacher_ckpt or HUB_TEACHER[args.role]):
        teacher = load_var(var_path(args.teacher_ckpt, HUB_TEACHER[args.role] or 30, '--teacher_ckpt'), device)
    vae = load_vae(vae_path(args.vae_ckpt), device)
    vocab = lambda m: m.vocab_size if m is vae else m.config['vocab_size']
    for name, m in (('teacher', teacher), ('VQVAE', vae)):
        if m is not None and (vocab(m), m.patch_nums) != (vocab(student), student.patch_nums):
            raise UserError(f'the student and the {name} differ in vocabulary or scales ({vocab(student)} tokens, scales '
                            f'{student.patch_nums}; the {name}: {vocab(m)} tokens, scales {m.patch_nums})')
    if vae.Cvae != student.config['Cvae'] or teacher is not None and teacher.num_classes != student.num_classes:
        raise UserError('the student, teacher and VQVAE disagree on the VQVAE width or the number of classes')
    # the student trains in fp32 on private storage (load_var freezes and may memory-map the file)
    for p in student.parameters():
        p.data = p.data.clone()
    return student.train().requires_grad_(True), teacher, vae


def wrap(student, args, world, device):
    """DDP by default; --fsdp: FSDP2 over every block, then the rest, sharding parameters,
    gradients and optimizer state."""
    if world == 1:
        return student
    if args.fsdp:
        import warnings
        from torch.distributed.fsdp import fully_shard
        # the logits come back as a view; nothing writes them in place, which is what FSDP2 warns about
        warnings.filterwarnings('ignore', message='FSDP2-wrapped module .* returned a view tensor')
        for block in student.blocks:
            fully_shard(block)
        return fully_shard(student)
    from torch.nn.parallel import DistributedDataParallel
    # gradients live in DDP's buckets rather than beside them: one copy of the gradients, not two
    return DistributedDataParallel(student, device_ids=[device.index] if device.type == 'cuda' else None,
                                   gradient_as_bucket_view=True)


def all_mean(values, world, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


def save_state(path, model, optimizer, step, rank):
    """Full (unsharded) weights and optimizer state, gathered on every process, written by rank 0 atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        with atomic_path(path) as tmp:
            torch.save(dict(model=msd, optimizer=osd, step=step, torch_rng=torch.get_rng_state()), tmp)
    distributed.barrier()


def full_weights(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state(path, model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    state = torch.load(path, map_location='cpu', weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'],
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(state['torch_rng'])
    return state['step']


def read_log(path, before_step):
    """The log lines of steps already in the saved state: a killed run may have logged a few more,
    the last perhaps cut short."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)['step'] < before_step:
                    kept.append(line if line.endswith('\n') else line + '\n')
            except (ValueError, KeyError):
                pass
    return kept


class Batches:
    """Tokens, labels and teacher-forcing inputs of this process's share of a global batch."""

    def __init__(self, tokens, labels, num_classes, vae, args, rank, world, device):
        self.tokens, self.labels, self.num_classes = tokens, labels, num_classes
        self.quantize, self.args, self.device = vae.quantize, args, device
        self.share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)

    def get(self, step):
        a = self.args
        rows = batch_rows(step, a.batch_size, len(self.labels), a.seed)[self.share]
        labels = np.where(dropped(step, a.batch_size, a.seed, a.cond_drop)[self.share], self.num_classes, self.labels[rows])
        tokens = torch.from_numpy(self.tokens[rows].astype(np.int64)).to(self.device)
        return torch.from_numpy(labels).to(self.device), tokens, self.quantize.teacher_inputs(tokens)


def step_loss(model, teacher, labels, tokens, inputs, positions, args, autocast):
    with autocast:
        logits = model(labels, inputs, positions.num_scales, positions.begin, args.grad_ckpt)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(labels, inputs, positions.num_scales, positions.begin)
    V = logits.shape[-1]
    targets = tokens[:, positions.begin:positions.end].reshape(-1)
    return distillation_loss(logits.reshape(-1, V), targets, None if teacher_logits is None else teacher_logits.reshape(-1, V),
                             args.alpha, args.kd_temp, args.label_smooth)


@torch.no_grad()
def validate(model, student, quantize, data, args, autocast, rank, world, device):
    """Held-out cross-entropy and top-1 accuracy per scale, true labels, every process a share."""
    S = len(student.patch_nums)
    sums = torch.zeros(3, S, dtype=torch.float64, device=device)  # ce, correct, count per scale
    level = student.scale_index(student.L).to(device)
    tokens, labels = data
    chunk, n = args.batch_size // world, len(labels)
    for begin in range(0, n, chunk * world):  # the same number of forwards on every process (FSDP needs them all)
        rows = np.arange(begin + rank * chunk, min(begin + (rank + 1) * chunk, n))
        weight = 1.0 if len(rows) else 0.0  # a process with nothing left runs one row that does not count
        rows = rows if len(rows) else np.arange(1)
        tok = torch.from_numpy(tokens[rows].astype(np.int64)).to(device)
        with autocast:
            logits = model(torch.from_numpy(labels[rows]).to(device), quantize.teacher_inputs(tok)).float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tok.flatten(), reduction='none').view_as(tok)
        right = (logits.argmax(-1) == tok).double()
        for total, values in zip(sums, (ce.double(), right, torch.ones_like(right))):
            total.index_add_(0, level, values.sum(0) * weight)
    if world > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[2]).tolist(), (sums[1] / sums[2]).tolist()


def run(args, rank, world, device, dtype):
    """Train as the flags say (finetune_CoDe.py parses them and sets up torchrun)."""
    say = print if rank == 0 else (lambda *a, **k: None)
    check_args(args, world)
    folder = os.path.abspath(args.output_dir)
    if rank == 0:
        prepare_output(folder)
    distributed.barrier()
    student, teacher, vae = load_models(args, device)
    settings = settings_of(args, student, teacher, vae)
    resuming = check_settings(folder, settings)
    positions = role_positions(args.role, args.draft_steps, student.begin_ends)
    vae_id = settings['vae']  # the encoder's content: a cache outlives where its file lay
    cache_dir = os.path.abspath(args.token_cache) if args.token_cache else os.path.join(folder, 'token_cache')
    tokens, labels, num_classes = token_cache(cache_dir, args.data, vae, vae_id, args.hflip, '--data', rank, world,
                                              args.encode_batch_size, args.workers)
    if num_classes > student.num_classes:
        raise UserError(f'--data has {num_classes} class folders; the student knows {student.num_classes} classes')
    val = None
    if args.val_data:
        val_tokens, val_labels, _ = token_cache(cache_dir + '_val', args.val_data, vae, vae_id, False, '--val_data', rank,
                                                world, args.encode_batch_size, args.workers)
        val = (val_tokens, val_labels)
    if rank == 0 and not resuming:
        save_json(os.path.join(folder, 'settings.json'), settings)

    model = wrap(student, args, world, device)
    optimizer = torch.optim.AdamW(param_groups(student, args.wd), lr=args.lr, betas=(0.9, 0.95),
                                  fused=device.type == 'cuda')
    state_path, log_path = os.path.join(folder, 'state.pth'), os.path.join(folder, 'log.jsonl')
    start = load_state(state_path, model, optimizer) if os.path.exists(state_path) else 0
    stop = args.total_steps if args.max_steps is None else min(args.max_steps, args.total_steps)
    batches = Batches(tokens, labels, student.num_classes, vae, args, rank, world, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    micro = args.batch_size // world // args.grad_accum
    if rank == 0:
        kept = read_log(log_path, start)
        with atomic_path(log_path) as tmp, open(tmp, 'w') as f:
            f.writelines(kept)
    say(f'{args.role}: VAR-d{student.depth} student{"" if teacher is None else f", VAR-d{teacher.depth} teacher"}, '
        f'{len(labels)} training rows, global batch {args.batch_size} on {world} process(es), '
        + (f'steps {start}..{stop - 1} of {args.total_steps}' + (f' (resumed at {start})' if start else '') if start < stop else
           f'already at step {start} of {args.total_steps}: nothing to train'
           + (' (the run is complete)' if start >= args.total_steps else ' (a larger --max_steps goes on)')))
    progress = timing.progress(rank == 0, total=stop, initial=start, unit='step')
    log = open(log_path, 'a') if rank == 0 else None
    try:
        for step in range(start, stop):
            t0 = time.perf_counter()
            labels_B, tokens_BL, inputs = batches.get(step)
            t_data = time.perf_counter() - t0
            lr = lr_at(step, args.lr, args.min_lr, args.warmup_steps, args.total_steps)
            for group in optimizer.param_groups:
                group['lr'] = lr
            optimizer.zero_grad(set_to_none=True)
            totals = [0.0, 0.0, 0.0]
            for m in range(args.grad_accum):
                part = slice(m * micro, (m + 1) * micro)
                last = m == args.grad_accum - 1
                sync = contextlib.nullcontext()
                if world > 1 and not last and not args.fsdp:
                    sync = model.no_sync()
                elif world > 1 and args.fsdp:
                    model.set_requires_gradient_sync(last)
                with sync:
                    out = step_loss(model, teacher, labels_B[part], tokens_BL[part], inputs[part], positions, args, autocast)
                    (out.loss / args.grad_accum).backward()
                totals = [t + float(v.detach()) / args.grad_accum if v is not None else t
                          for t, v in zip(totals, (out.loss, out.ce, out.kd))]
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip if args.grad_clip > 0 else float('inf'))
            if hasattr(grad_norm, 'full_tensor'):  # FSDP2: a sharded norm
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            loss, ce, kd = all_mean(totals, world, device)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            t_step = time.perf_counter() - t0
            entry = dict(step=step, loss=loss, ce=ce, kd=kd if teacher is not None else None, lr=lr,
                         grad_norm=float(grad_norm), images_per_s=args.batch_size / t_step, data_s=t_data, step_s=t_step)
            if val is not None and ((step + 1) % args.val_every == 0 or step + 1 == stop):
                entry['val_ce'], entry['val_acc'] = validate(model, student, vae.quantize, val, args, autocast, rank, world, device)
            if log:
                log.write(json.dumps(entry) + '\n')
                log.flush()
            progress.update(1)
            progress.set_postfix(loss=f'{loss:.4f}')
            if (step + 1) % args.save_every == 0 or step + 1 == stop:
                save_state(state_path, model, optimizer, step + 1, rank)
    finally:
        progress.close()
        if log:
            log.close()
    weights = full_weights(model)
    if rank == 0:
        save_var(weights, student, os.path.join(folder, 'weights.pth'))
        say(f'done: {max(start, stop)} of {args.total_steps} steps; weights in {os.path.join(folder, "weights.pth")}')
    distributed.barrier()
