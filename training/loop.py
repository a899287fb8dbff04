"""CoDe's specialized fine-tuning: the loop behind finetune_CoDe.py.

Everything a step does is a function of (settings, step): the batch is a slice of a per-epoch
permutation seeded by --seed; the crops, the "no class" rows and the dropped paths come from
generators seeded by --seed and the step; the learning rate and weight decay are pure functions of
the step. The resumable state is therefore the weights, the optimizer, the loss scale and the step;
a rerun continues exactly where the saved state stopped.
"""
import contextlib
import hashlib
import json
import math
import os
import time
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

from utils import distributed, timing
from utils.checkpoints import load_vae, load_var, save_var, var_path, vae_path, weights_digest
from utils.cli import check_folder_writable
from utils.errors import UserError
from utils.io import atomic_path, check_same_settings, remove_temporaries, save_json

from .data import (CROPS, batch_rows, class_indices, crop_stream, encode, read_class_map, scan_image_folder,
                   token_cache)
from .losses import ROLES, distillation_loss, role_positions
from .schedule import SCHEDULES, LossScaler, lr_wd_at, param_groups, recipe, set_lr_wd

# flags that change only what is logged, how fast, or when this invocation stops, not the weights a run ends with
NOT_SETTINGS = {'max_steps', 'save_every', 'val_data', 'val_every', 'output_dir', 'token_cache', 'workers',
                'encode_batch_size', 'fsdp', 'grad_ckpt', 'max_skips', 'from_hub'}
# flags replaced in the settings by what they stand for: the models' content and the class indices
BY_CONTENT = {'student_ckpt', 'teacher_ckpt', 'vae_ckpt', 'class_map'}
HUB_STUDENT = {'drafter': 30, 'refiner': 16, 'all': 16}
HUB_TEACHER = {'drafter': None, 'refiner': 30, 'all': 30}
# clip_grad_norm_ under its own name here, so that a test can put a non-finite gradient in front of it
clip_grad_norm = torch.nn.utils.clip_grad_norm_

# the files a run writes in OUTPUT_DIR, each by write-then-rename
OUTPUT_FILES = ('state.pth', 'weights.pth', 'log.jsonl', 'settings.json', 'classes.json')


class Diverged(Exception):
    """The run cannot go on: finetune_CoDe.py prints the one line and exits with status 1."""


def seed_of(*parts):
    return int.from_bytes(hashlib.sha256(','.join(map(str, parts)).encode()).digest()[:8], 'little') >> 1


def dropped(step, batch_size, seed, rate):
    """Which rows of global batch `step` get the "no class" label (VAR's class dropout)."""
    g = torch.Generator().manual_seed(seed * 1000003 + 7 + step * 2)
    return torch.rand(batch_size, generator=g).numpy() < rate


def drop_path_rates(rate, depth):
    """VAR's stochastic depth: the rate rises linearly over the blocks, from 0 to `rate` at the last."""
    return torch.linspace(0, rate, depth).tolist()


def drop_path_keep(step, batch_size, rates, seed):
    """(depth, 2, global batch): each row's factor on each block's two residual branches, 0 (dropped, with
    the block's rate) or 1 / (1 - rate), as VAR's DropPath; None when no block drops anything."""
    if not any(rates):
        return None
    p = torch.tensor(rates).view(-1, 1, 1)
    u = torch.rand(len(rates), 2, batch_size, generator=torch.Generator().manual_seed(seed_of('drop path', seed, step)))
    return (u >= p).float() / (1 - p)


def check_file_flag(flag, path):
    if os.path.isdir(path):
        raise UserError(f'{flag} {path} is a folder; give a file')
    if not os.path.exists(path):
        raise UserError(f'{flag} {path}: no such file')


def check_args(args, world):
    """Every check that needs no model and no image: before anything is downloaded, read or encoded."""
    if args.role not in ROLES:
        raise UserError(f'--role must be one of {", ".join(ROLES)}')
    if args.role != 'all' and not 1 <= args.draft_steps <= 9:
        raise UserError(f'--draft_steps must be in 1-9 for --role {args.role}, got {args.draft_steps}')
    if args.role == 'refiner' and not args.student_ckpt and not args.from_hub:
        raise UserError('--role refiner trains stage 2 from stage 1\'s weights: pass --student_ckpt (the weights.pth of a '
                        '--role all run), or --from_hub to start from the hub\'s VAR-d16 on purpose')
    if args.crop not in CROPS or args.sched not in SCHEDULES:
        raise UserError(f'--crop must be one of {", ".join(CROPS)} and --sched one of {", ".join(SCHEDULES)}')
    if not 0 <= args.alpha <= 1:
        raise UserError(f'--alpha must be in [0, 1], got {args.alpha}')
    for flag in ('blr', 'kd_temp', 'batch_size', 'total_steps', 'grad_accum', 'save_every', 'val_every', 'encode_batch_size',
                 'max_skips'):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f'--{flag} must be > 0, got {getattr(args, flag)}')
    for flag in ('wd', 'wd_end', 'warmup', 'grad_clip', 'label_smooth', 'cond_drop', 'workers', 'drop_path'):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UserError(f'--{flag} must be >= 0, got {getattr(args, flag)}')
    for flag in ('wpe', 'wp0'):
        if getattr(args, flag) is not None and not 0 <= getattr(args, flag) <= 1:
            raise UserError(f'--{flag} must be in [0, 1], got {getattr(args, flag)}')
    if args.label_smooth >= 1 or args.cond_drop > 1 or args.drop_path is not None and args.drop_path >= 1:
        raise UserError('--label_smooth and --drop_path must be < 1, --cond_drop <= 1')
    if args.warmup is not None and args.warmup >= args.total_steps:
        raise UserError(f'--warmup {args.warmup} must end before --total_steps {args.total_steps}')
    if args.max_steps is not None and args.max_steps < 0:
        raise UserError(f'--max_steps must be >= 0, got {args.max_steps}')
    if args.batch_size % world:
        raise UserError(f'--batch_size {args.batch_size} is not divisible by the {world} processes')
    if (args.batch_size // world) % args.grad_accum:
        raise UserError(f'the per-process batch {args.batch_size // world} is not divisible by --grad_accum {args.grad_accum}')
    for flag in ('student_ckpt', 'teacher_ckpt', 'vae_ckpt', 'class_map'):
        value = getattr(args, flag)
        if value and not (flag == 'teacher_ckpt' and value == 'none'):
            check_file_flag(f'--{flag}', value)
    for flag in ('output_dir', 'token_cache'):
        if getattr(args, flag) and os.path.isfile(getattr(args, flag)):
            raise UserError(f'--{flag} {getattr(args, flag)} is a file; give a folder')


def resolve_defaults(args, depth):
    """The defaults that depend on the student's depth (VAR's recipes) and on --total_steps."""
    r = recipe(depth)
    for k in ('blr', 'wpe', 'drop_path'):
        if getattr(args, k) is None:
            setattr(args, k, r[k])
    if args.wd_end is None:
        args.wd_end = args.wd if r['wd_end'] is None else r['wd_end']
    if args.warmup is None:
        args.warmup = round(0.02 * args.total_steps)  # VAR's wp = ep / 50
    return args


def digest_of(items):
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def settings_of(args, student, teacher, vae, files=(), classes=None):
    """What the trained weights depend on: the flags, the data and the models' content (not where their
    files lie, so that a rerun may find them elsewhere, as sample_CoDe.py's manifest)."""
    s = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS | BY_CONTENT}
    s['data'] = os.path.abspath(args.data)
    s['device'] = torch.device(args.device).type
    s.update(student=weights_digest(student), teacher=teacher and weights_digest(teacher), vae=weights_digest(vae),
             data_files=digest_of(list(files)), classes=classes)
    return s


def prepare_output(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'--output_dir {folder}: cannot create it ({e.strerror})') from None
    check_folder_writable(folder, f'--output_dir {folder}')


def check_settings(folder, settings):
    """A rerun in the same folder must be the same run (only the flags of NOT_SETTINGS may change)."""
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


def all_sum(values, world, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def local(t):
    return t.to_local() if hasattr(t, 'to_local') else t  # FSDP2: this process's shard


def all_finite(model, optimizer, world, device):
    """Whether every weight and optimizer moment is finite, on every process."""
    tensors = [p for p in model.parameters()] + [v for s in optimizer.state.values() for v in s.values()
                                                 if isinstance(v, torch.Tensor) and v.is_floating_point()]
    bad = sum(int(not torch.isfinite(local(t)).all()) for t in tensors)
    return all_sum([bad], world, device)[0] == 0


def save_state(path, model, optimizer, scaler, step, rank):
    """Full (unsharded) weights, optimizer state and loss scale, gathered on every process, written by rank 0
    atomically: the previous state.pth stays until the new one is whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        with atomic_path(path) as tmp:
            torch.save(dict(model=msd, optimizer=osd, scaler=scaler.state_dict(), step=step, torch_rng=torch.get_rng_state()), tmp)
    distributed.barrier()


def full_weights(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state(path, model, optimizer, scaler):
    """Memory-mapped (mmap=True): the processes of a node share one copy in the page cache, not one each."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'],
                   options=StateDictOptions(full_state_dict=True))
    scaler.load_state_dict(state['scaler'])
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
    """Labels, tokens and teacher-forcing inputs of this process's share of a global batch: tokens from the
    token cache, or (tokens None) images cropped by `stream(first_step)` and encoded here, on the device."""

    def __init__(self, tokens, labels, num_classes, vae, args, rank, world, device, stream=None):
        self.tokens, self.labels, self.num_classes = tokens, labels, num_classes
        self.vae, self.args, self.device, self.stream = vae, args, device, stream
        self.share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
        self.images, self.next = None, None

    def get(self, step):
        a = self.args
        rows = batch_rows(step, a.batch_size, len(self.labels), a.seed)[0][self.share]
        labels = np.where(dropped(step, a.batch_size, a.seed, a.cond_drop)[self.share], self.num_classes, self.labels[rows])
        if self.tokens is not None:
            tokens = torch.from_numpy(self.tokens[rows].astype(np.int64)).to(self.device)
        else:
            if step != self.next:  # the crop stream runs ahead from the step it was started at
                self.images = self.stream(step)
            tokens = encode(self.vae, next(self.images)).long()
            self.next = step + 1
        return torch.from_numpy(labels).to(self.device), tokens, self.vae.quantize.teacher_inputs(tokens)


def step_loss(model, teacher, labels, tokens, inputs, positions, args, autocast, keep=None):
    with autocast:
        logits = model(labels, inputs, positions.num_scales, positions.begin, args.grad_ckpt, keep)
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
    """Held-out cross-entropy and top-1 accuracy per scale, true labels, every process a share, eval mode
    (no drop path)."""
    S = len(student.patch_nums)
    sums = torch.zeros(3, S, dtype=torch.float64, device=device)  # ce, correct, count per scale
    level = student.scale_index(student.L).to(device)
    tokens, labels = data
    chunk, n = args.batch_size // world, len(labels)
    student.eval()
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
    student.train()
    if world > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[2]).tolist(), (sums[1] / sums[2]).tolist()


def labelled_files(args, folder_flag, root, num_classes, class_map):
    """(files, per-file class index, {folder: index}) of an ImageFolder, checked before anything is encoded."""
    classes, files, positions = scan_image_folder(root, folder_flag)
    indices = class_indices(classes, num_classes, folder_flag, class_map, args.class_map)
    return files, np.asarray(indices, dtype=np.int64)[positions], dict(zip(classes, indices))


class Prepared(NamedTuple):
    student: torch.nn.Module
    teacher: Optional[torch.nn.Module]
    vae: torch.nn.Module
    files: list          # --data's images, relative to it
    file_labels: np.ndarray
    classes: dict        # class folder -> class index
    val: Optional[tuple]  # (files, labels) of --val_data
    settings: dict


def prepare(args, device):
    """The models, the data's files and class indices and the run's settings: every check made, with the
    defaults by depth filled in, before anything is encoded or written."""
    student, teacher, vae = load_models(args, device)
    class_map = read_class_map(args.class_map) if args.class_map else None
    files, file_labels, classes = labelled_files(args, '--data', args.data, student.num_classes, class_map)
    val = labelled_files(args, '--val_data', args.val_data, student.num_classes, class_map)[:2] if args.val_data else None
    resolve_defaults(args, student.depth)
    settings = settings_of(args, student, teacher, vae, files, classes)
    return Prepared(student, teacher, vae, files, file_labels, classes, val, settings)


def run(args, rank, world, device, dtype):
    """Train as the flags say (finetune_CoDe.py parses them and sets up torchrun)."""
    say = print if rank == 0 else (lambda *a, **k: None)
    check_args(args, world)
    folder = os.path.abspath(args.output_dir)
    if rank == 0:
        prepare_output(folder)
        for name in OUTPUT_FILES:  # what a killed run of this folder left half-written
            remove_temporaries(folder, name)
    distributed.barrier()
    student, teacher, vae, files, file_labels, classes, val_files, settings = prepare(args, device)
    resuming = check_settings(folder, settings)
    if rank == 0:
        save_json(os.path.join(folder, 'classes.json'), classes)
    positions = role_positions(args.role, args.draft_steps, student.begin_ends)
    views = 2 if args.hflip else 1
    cache_dir = os.path.abspath(args.token_cache) if args.token_cache else os.path.join(folder, 'token_cache')

    def cache(where, root, names, mode, hflip):  # the VQVAE's content names it: a cache outlives where its file lay
        return token_cache(where, root, names, vae, settings['vae'], mode, hflip, rank, world, args.encode_batch_size, args.workers)
    tokens = None if args.crop == 'var' else cache(cache_dir, args.data, files, args.crop, args.hflip)
    val = None
    if val_files:  # VAR validates on the centre crop
        val = (cache(cache_dir + '_val', args.val_data, val_files[0], 'none' if args.crop == 'none' else 'center', False),
               val_files[1])
    if rank == 0 and not resuming:
        save_json(os.path.join(folder, 'settings.json'), settings)

    model = wrap(student, args, world, device)
    optimizer = torch.optim.AdamW(param_groups(student, args.wd), lr=args.blr, betas=(0.9, 0.95),
                                  fused=device.type == 'cuda')
    scaler = LossScaler(dtype == torch.float16)
    state_path, log_path = os.path.join(folder, 'state.pth'), os.path.join(folder, 'log.jsonl')
    start = load_state(state_path, model, optimizer, scaler) if os.path.exists(state_path) else 0
    stop = args.total_steps if args.max_steps is None else min(args.max_steps, args.total_steps)
    labels = np.repeat(file_labels, views)
    share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)

    def stream(first):
        return crop_stream(args.data, files, views, args.batch_size, share, args.seed, first, args.workers)
    batches = Batches(tokens, labels, student.num_classes, vae, args, rank, world, device, stream)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    micro = args.batch_size // world // args.grad_accum
    peak = args.blr * args.batch_size / 256  # VAR's lr = base lr x global batch / 256
    rates = drop_path_rates(args.drop_path, student.depth)
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
    skipped, in_row, saved, pending = 0, 0, start, False
    try:
        for step in range(start, stop):
            t0 = time.perf_counter()
            labels_B, tokens_BL, inputs = batches.get(step)
            keep = drop_path_keep(step, args.batch_size, rates, args.seed)
            keep = None if keep is None else keep[:, :, share].to(device)
            t_data = time.perf_counter() - t0
            lr, wd = lr_wd_at(step, args.total_steps, peak, args.warmup, args.wp0, args.wpe, args.sched, args.wd, args.wd_end)
            set_lr_wd(optimizer, lr, wd)
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
                    out = step_loss(model, teacher, labels_B[part], tokens_BL[part], inputs[part], positions, args, autocast,
                                    None if keep is None else keep[:, :, part])
                    (out.loss * (scaler.scale / args.grad_accum)).backward()
                totals = [t + float(v.detach()) / args.grad_accum if v is not None else t
                          for t, v in zip(totals, (out.loss, out.ce, out.kd))]
            scaler.unscale_(student.parameters())  # before clipping, as VAR
            grad_norm = clip_grad_norm(student.parameters(), args.grad_clip if args.grad_clip > 0 else float('inf'))
            if hasattr(grad_norm, 'full_tensor'):  # FSDP2: a sharded norm
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            # one decision for every process: a gradient overflows on one process only when it is sharded
            *sums, bad = all_sum(totals + [float(not (math.isfinite(grad_norm) and all(map(math.isfinite, totals))))], world, device)
            loss, ce, kd = (v / world for v in sums)
            finite = bad == 0
            if finite:
                optimizer.step()
                in_row = 0
            else:
                optimizer.zero_grad(set_to_none=True)
                skipped, in_row = skipped + 1, in_row + 1
            scaler.update(finite)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            t_step = time.perf_counter() - t0
            entry = dict(step=step, loss=loss if finite else None, ce=ce if finite else None,
                         kd=kd if teacher is not None and finite else None, lr=lr, wd=wd,
                         grad_norm=grad_norm if math.isfinite(grad_norm) else None, images_per_s=args.batch_size / t_step,
                         data_s=t_data, step_s=t_step)
            if scaler.enabled:
                entry['loss_scale'] = scaler.scale
            if not finite:
                entry['skipped'] = True
            if val is not None and ((step + 1) % args.val_every == 0 or step + 1 == stop):
                entry['val_ce'], entry['val_acc'] = validate(model, student, vae.quantize, val, args, autocast, rank, world, device)
            if log:
                log.write(json.dumps(entry) + '\n')
                log.flush()
            progress.update(1)
            progress.set_postfix(loss='skipped' if not finite else f'{loss:.4f}', **({'skipped': skipped} if skipped else {}))
            if in_row >= args.max_skips:
                raise Diverged(f'{in_row} steps in a row ({step - in_row + 1}-{step}) had a non-finite loss or gradient and were '
                               f'skipped; stopped. ' + (f'The last good state is {state_path} (step {saved})' if saved else
                                                         'No state was saved yet'))
            pending = pending or (step + 1) % args.save_every == 0 or step + 1 == stop
            # saved after a clean step (or at the end), and only once the optimizer has stepped: saving an empty
            # optimizer makes torch.distributed.checkpoint initialise it with a step of its own, which a rerun
            # would then count (before that, a rerun from step 0 redoes nothing but skipped steps)
            if pending and (finite or step + 1 == stop) and optimizer.state:
                if not all_finite(student, optimizer, world, device):
                    raise Diverged(f'the weights or optimizer state are not finite after step {step}; not saved. '
                                   + (f'The last good state is {state_path} (step {saved})' if saved else 'No state was saved yet'))
                save_state(state_path, model, optimizer, scaler, step + 1, rank)
                saved, pending = step + 1, False
    finally:
        progress.close()
        if log:
            log.close()
    weights = full_weights(model)
    if rank == 0:
        save_var(weights, student, os.path.join(folder, 'weights.pth'))
        say(f'done: {max(start, stop)} of {args.total_steps} steps; weights in {os.path.join(folder, "weights.pth")}'
            + (f'; {skipped} non-finite step(s) skipped' if skipped else ''))
    distributed.barrier()
