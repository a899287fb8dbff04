"""Speed and memory of plain VAR and CoDe: the paper's efficiency tables (Tab. 3, Fig. 5b, 5c).

For every mode (`original` = the drafter alone over all 10 scales; a number N = CoDe with N draft
steps; each --schedule, a chain of any models) and batch size: latency (median and spread over --repeats, warm-up excluded, synchronised),
images/s, speedup over `original` at the same batch size, achieved TFLOP/s (and the share of
--peak_tflops), peak memory split into parameters, KV cache and running memory, and the time of
every scale for drafter and refiner; each without and with the VQVAE decode. Prints the tables,
and writes every figure to --json; --plot draws latency against batch size (matplotlib).

    python benchmark.py --random_weights --modes original,8,6 --batch_sizes 1,16,64 --peak_tflops 800
    python benchmark.py --random_weights --device cpu --drafter_depth 8 --refiner_depth 4 --batch_sizes 1,4 --paths fast,straightforward
    python benchmark.py --random_weights --modes original,8,6 --schedule d30:6,d20:8,d16   # a three-model cascade beside CoDe

--random_weights builds the models at their real sizes with random weights (nothing is downloaded;
speed does not depend on the weights' values). Without it the official var_d{depth}.pth files (or
--drafter_ckpt / --refiner_ckpt) serve every mode.
"""
import json
import math
import platform
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import VAR, VQVAE, Stage, code_schedule, generate
from models.var import compile_steps, hold_weights_in
from utils.checkpoints import check_agreement, hub_depth, load_vae, load_var, parse_schedule, vae_path, var_path
from utils.cli import CODE_TEMP, DTYPES, Parser, autocast, check_writable, comma_list, main_guard, runtime
from utils.io import check_image_path
from utils.errors import UserError
from utils.timing import Clock, reset_peak_memory
from utils import simulate as sim

MiB = 2 ** 20


def parser():
    p = Parser(description=__doc__.split('\n\n')[0])
    p.add_argument('--modes', type=comma_list(str, '--modes'), default='original,9,8,7,6', help="'original' and CoDe draft steps (default original,9,8,7,6)")
    p.add_argument('--schedule', action='append', default=[],
                   help='also measure this chain of models, MODEL:STOP,...,MODEL, e.g. d30:6,d20:8,d16 (dNN: that depth, random or '
                        'official weights as for the other modes; or a checkpoint path); repeatable')
    p.add_argument('--drafter_depth', type=int, default=30, help="drafter VAR depth, also the 'original' model (default 30)")
    p.add_argument('--refiner_depth', type=int, default=16, help='refiner VAR depth (default 16)')
    p.add_argument('--batch_sizes', type=comma_list(int, '--batch_sizes'), default='1,16,64', help='comma-separated batch sizes (default 1,16,64)')
    p.add_argument('--random_weights', action='store_true', help='real sizes, random weights, no download')
    p.add_argument('--drafter_ckpt', default=None, help='local drafter checkpoint (default: var_d{drafter_depth}.pth from the hub)')
    p.add_argument('--refiner_ckpt', default=None, help='local refiner checkpoint (default: var_d{refiner_depth}.pth from the hub)')
    p.add_argument('--vae_ckpt', default=None, help='local VQVAE checkpoint (default: vae_ch160v4096z32.pth from the hub)')
    p.add_argument('--vae_ch', type=int, default=160, help='VQVAE width with --random_weights (default 160, the official)')
    p.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda if available)')
    p.add_argument('--dtype', choices=list(DTYPES), default=None, help='autocast precision (default fp16 on CUDA, fp32 on CPU)')
    p.add_argument('--compile', action='store_true', help='CUDA graphs per scale (torch.compile reduce-overhead); off on CPU')
    p.add_argument('--paths', type=comma_list(str, '--paths'), default='fast',
                   help="'fast' (default) and/or 'straightforward' (the reference's growing cache, per-scale AdaLN, full-vocabulary sampling)")
    p.add_argument('--warmup', type=int, default=1, help='untimed runs first, per mode and batch size (default 1)')
    p.add_argument('--repeats', type=int, default=5, help='timed runs, per mode and batch size (default 5)')
    p.add_argument('--peak_tflops', type=float, default=None, help="the device's peak, for the share achieved (e.g. 800 for an H100 in bf16)")
    p.add_argument('--simulate', action='store_true',
                   help='no GPU needed: the peak GPU memory of every mode and batch size, on fake CUDA tensors at the real sizes '
                        '(weights are not needed; no timings); default --dtype fp16')
    p.add_argument('--fit', type=comma_list(float, '--fit'), default=None, metavar='GB',
                   help='with --simulate: the largest batch of each mode whose peak, decode included, fits in GB (1e9 bytes); '
                        'comma-separated for several, e.g. 24,40,80')
    p.add_argument('--finetune', type=comma_list(str, '--finetune'), default=None, metavar='ROLES',
                   help='with --simulate: fine-tuning memory per GPU instead, for these roles (drafter, refiner, all), under DDP and '
                        'FSDP2, without and with --grad_ckpt, at a per-GPU batch of each --batch_sizes (bf16 autocast)')
    p.add_argument('--draft_steps', type=int, default=8, help='with --finetune: N of the drafter and refiner roles (default 8)')
    p.add_argument('--world_size', type=int, default=8, help='with --finetune: processes of the fake process group (default 8)')
    p.add_argument('--json', default=None, help='write every figure (and the command, device, torch version) here as JSON')
    p.add_argument('--plot', default=None, help='latency against batch size per mode, as a PNG (needs matplotlib)')
    return p


def check(args):
    for m in args.modes:
        if m != 'original' and not (m.isdigit() and 1 <= int(m) <= 9):
            raise UserError(f"--modes: {m!r} is neither 'original' nor a number of draft steps 1-9")
    for flag in ('drafter_depth', 'refiner_depth'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be >= 1, got {getattr(args, flag)}')
    if args.vae_ch < 32 or args.vae_ch % 32:  # its GroupNorms have 32 groups
        raise UserError(f'--vae_ch must be a positive multiple of 32 (the official VQVAE has 160), got {args.vae_ch}')
    if args.random_weights:
        given = [f'--{f}' for f in ('drafter_ckpt', 'refiner_ckpt', 'vae_ckpt') if getattr(args, f)]
        if given:
            raise UserError(f'--random_weights builds every model with random weights; drop {given[0]}, or drop --random_weights '
                            'to measure the files')
    for text in args.schedule:
        stages = parse_schedule(text, hub=not args.random_weights)
        if args.random_weights and any(hub_depth(spec) is None for spec, _ in stages):
            raise UserError(f'--schedule {text}: with --random_weights every model is a depth dNN, not a file')
        if any(hub_depth(spec) == 0 for spec, _ in stages):
            raise UserError(f'--schedule {text}: a depth must be >= 1')
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise UserError('--batch_sizes must be positive')
    if args.repeats < 1 or args.warmup < 0:
        raise UserError('--repeats must be >= 1 and --warmup >= 0')
    if set(args.paths) - {'fast', 'straightforward'}:
        raise UserError("--paths takes 'fast' and/or 'straightforward'")
    if args.compile and 'straightforward' in args.paths:
        raise UserError('--compile applies to the fast path only; drop straightforward from --paths')
    if args.json:
        check_writable(args.json, '--json')
    if args.plot:
        check_image_path(args.plot, '--plot')
        check_writable(args.plot, '--plot')
        try:
            import matplotlib  # noqa: F401  (in requirements.txt; only --plot needs it)
        except ImportError:
            raise UserError('--plot needs matplotlib (pip install matplotlib)') from None


# ----------------------------------------------------------------------------- models

def random_weights_(model, seed):
    """Weights of the right scale for stable activations; their values do not affect speed."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('scale_mul_1H11'):
                p.fill_(math.log(4.0))
            elif p.ndim == 1:
                p.fill_(1.0 if name.endswith('.weight') else 0.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
    return model.eval().requires_grad_(False)


def random_model(cls, device, seed, **config):
    with torch.device('meta'):
        model = cls(**config)
    return random_weights_(model.to_empty(device=device), seed)


def fake_model(cls, device, seed, **config):
    """For --simulate, inside utils.simulate.fake_cuda(): built in place (to_empty cannot swap fake tensors);
    fake tensors hold no values to set."""
    with torch.device(device):
        return cls(**config).eval().requires_grad_(False)


def build(args, device, weights_dtype=torch.float32):
    """The VQVAE and {mode: schedule}; every model is built or loaded once, by name: a depth dNN (random
    weights, or the official var_dNN.pth) or a checkpoint path. The weights autocast casts are held in
    weights_dtype, as the scripts hold them (utils.infer.prepare)."""
    make = fake_model if args.simulate else random_model
    vae = make(VQVAE, device, 0, ch=args.vae_ch) if args.random_weights else load_vae(vae_path(args.vae_ckpt), device)
    vae.hold_decoder_in(weights_dtype)
    models = {}

    def model(spec):
        if spec not in models:
            depth = hub_depth(spec)
            if depth is not None and args.random_weights:
                models[spec] = make(VAR, device, depth, depth=depth, embed_dim=64 * depth, num_heads=depth)
            else:
                models[spec] = load_var(spec if depth is None else var_path(None, depth, '--schedule'), device)
            hold_weights_in(models[spec], weights_dtype)
        return models[spec]

    drafter = f'd{args.drafter_depth}' if args.random_weights or not args.drafter_ckpt else args.drafter_ckpt
    refiner = f'd{args.refiner_depth}' if args.random_weights or not args.refiner_ckpt else args.refiner_ckpt
    schedules = {}
    for mode in args.modes + args.schedule:
        if mode == 'original':
            schedules[mode] = [Stage(model(drafter), 10)]
        elif mode.isdigit():
            schedules[mode] = code_schedule(model(drafter), model(refiner), int(mode))
        else:
            schedules[mode] = [Stage(model(spec), stop) for spec, stop in parse_schedule(mode, hub=not args.random_weights)]
        check_agreement(schedules[mode], vae)
    return vae, schedules


# ----------------------------------------------------------------------------- counting

def sampling_flops(schedule, B, vae_Cvae=32, side=16):
    """Multiply-add FLOPs (2 per MAC) of generate() for B images, both CFG halves: linear layers
    (blocks, AdaLN once per model, word embedding, head on sampled scales), attention (QK^T and AV
    over the cache) and the quantiser's phi convs. Counted from the architecture."""
    linear = attention = 0
    first = 0
    for model, stop in schedule:
        C, V = model.C, model.config['vocab_size']
        H = round(C * model.config['mlp_ratio'])
        linear += 2 * (2 * B) * C * (6 * C * model.depth + 2 * C)  # AdaLN of every block and the head, once
        for si in range(stop):
            begin, end = model.begin_ends[si]
            l, T = end - begin, 2 * B * (end - begin)
            if si > 0:
                linear += 2 * B * l * model.config['Cvae'] * C
            linear += 2 * T * model.depth * (3 * C * C + C * C + 2 * C * H)
            attention += 2 * 2 * T * end * C * model.depth
            if si >= first:
                linear += 2 * T * C * V
        first = stop
    phi = 2 * B * side * side * vae_Cvae * vae_Cvae * 9 * len(schedule[0].model.patch_nums)
    return {'linear': linear, 'attention': attention, 'phi': phi, 'total': linear + attention + phi}


def decode_flops(vae, B):
    """FLOPs of the VQVAE decode, counted by torch's FlopCounterMode on a meta copy."""
    with torch.device('meta'):
        meta = VQVAE(**vae.config)
        f_hat = torch.zeros(B, vae.Cvae, vae.patch_nums[-1], vae.patch_nums[-1])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta.decode(f_hat)
    return counter.get_total_flops()


def kv_cache_bytes(schedule, B, dtype, growing=False):
    """The largest cache alive at once (each model's is freed before the next allocates):
    2 (K, V) x 2B x layers x positions x width x element size, the positions being those before the
    stage's last scale (no later scale reads that one's; see models.var.KVCache). growing: the
    reference's cache, which keeps every position it ran."""
    size = torch.empty((), dtype=dtype).element_size()
    return max(2 * 2 * B * m.depth * m.begin_ends[stop - 1][1 if growing else 0] * m.C * size for m, stop in schedule)


def param_bytes(*models):
    return sum(p.numel() * p.element_size() for m in {id(m): m for m in models if m is not None}.values() for p in m.parameters())


# ----------------------------------------------------------------------------- measuring

def measure(schedule, vae, B, args, device, dtype, fast):
    """Timed runs; with them, on a GPU, the peaks of max_memory_allocated over the repeats: of the sampling,
    and of the sampling plus the decode. The straightforward path decodes the whole batch at once, as the
    reference does."""
    labels = (torch.arange(B, device=device) * 37) % 1000
    kw = dict(seed=0, cfg=1.5, top_k=600, top_p=0.96, temp=[float(t) for t in CODE_TEMP.split(',')], fast=fast)
    records, peaks = [], [0, 0]
    cuda = device.type == 'cuda'

    def once():
        clock = Clock(device)
        scale_marks = []
        start = clock.mark()
        _, f_hat = generate(schedule, vae, labels, on_scale=lambda stage, si, prefill: scale_marks.append((stage, si, prefill, clock.mark())), **kw)
        sampled = clock.mark()
        if cuda:  # the allocator's counters, kept on the host: no sync
            peaks[0] = max(peaks[0], torch.cuda.max_memory_allocated(device))
        vae.decode(f_hat, **({} if fast else dict(chunk=None)))
        decoded = clock.mark()
        clock.synchronize()
        per_scale, last = [], start
        for stage, si, prefill, mark in scale_marks:
            per_scale.append((stage, si, prefill, clock.ms(last, mark)))
            last = mark
        return clock.ms(start, sampled), clock.ms(sampled, decoded), per_scale

    with torch.inference_mode(), autocast(device, dtype):
        for _ in range(args.warmup):
            once()
        reset_peak_memory(device)
        peaks[0] = 0
        for _ in range(args.repeats):
            records.append(once())
    peak = (peaks[0], torch.cuda.max_memory_allocated(device)) if cuda else (None, None)
    return records, peak


def summarise(records):
    sample = [r[0] for r in records]
    total = [r[0] + r[1] for r in records]
    scales = {}
    for r in records:
        for stage, si, prefill, ms in r[2]:
            scales.setdefault((stage, si, prefill), []).append(ms)
    return sample, total, {k: statistics.median(v) for k, v in scales.items()}


def role(stage, stages):
    return 'drafter' if stage == 0 else 'refiner' if stage == stages - 1 else 'middle'


def describe(mode, path, B, schedule, vae):
    """What a row is and its counted FLOPs: the keys measured and simulated rows share."""
    flops = sampling_flops(schedule, B, vae.Cvae)
    return dict(mode=mode, path=path, batch=B,
                models=[f'VAR-d{m.depth} scales {0 if i == 0 else schedule[i - 1].stop}-{stop - 1}' for i, (m, stop) in enumerate(schedule)],
                tflop=flops['total'] / 1e12, tflop_decode=decode_flops(vae, B) / 1e12, tflop_parts={k: v / 1e12 for k, v in flops.items()})


def run(args):
    device, dtype = runtime(args)
    results = []
    for path in args.paths:  # the straightforward path holds the fp32 weights, as the reference does
        vae, schedules = build(args, device, dtype if path == 'fast' else torch.float32)
        if args.compile:
            for schedule in schedules.values():
                for stage in schedule:
                    compile_steps(stage.model)
        for mode, schedule in schedules.items():
            for B in args.batch_sizes:
                records, (peak_sampling, peak) = measure(schedule, vae, B, args, device, dtype, fast=path == 'fast')
                sample, total, scales = summarise(records)
                params = param_bytes(vae, *(m for m, _ in schedule))
                kv = kv_cache_bytes(schedule, B, torch.float32 if dtype == torch.float32 else dtype, growing=path == 'straightforward')
                r = describe(mode, path, B, schedule, vae)
                r.update(ms=statistics.median(sample), ms_min=min(sample), ms_max=max(sample),
                         ms_with_decode=statistics.median(total), ms_with_decode_min=min(total), ms_with_decode_max=max(total),
                         params_mib=params / MiB, kv_cache_mib=kv / MiB,
                         peak_mib=None if peak is None else peak / MiB,
                         peak_sampling_mib=None if peak_sampling is None else peak_sampling / MiB,
                         running_mib=None if peak is None else (peak - params - kv) / MiB,
                         scale_ms=[dict(model=f'VAR-d{schedule[stage].model.depth}', stage=stage, role=role(stage, len(schedule)),
                                        scale=si, prefill=prefill, ms=ms) for (stage, si, prefill), ms in sorted(scales.items())])
                r['images_per_s'] = B / r['ms'] * 1000
                r['images_per_s_with_decode'] = B / r['ms_with_decode'] * 1000
                r['tflops'] = r['tflop'] / r['ms'] * 1000
                r['tflops_with_decode'] = (r['tflop'] + r['tflop_decode']) / r['ms_with_decode'] * 1000
                if args.peak_tflops:
                    r['peak_share'] = r['tflops'] / args.peak_tflops
                results.append(r)
                print(f'  measured {path} {mode} batch {B}: {r["ms"]:.1f} ms', file=sys.stderr, flush=True)
        del vae, schedules  # the next path builds its own models
    for r in results:
        base = next((o for o in results if o['mode'] == 'original' and o['path'] == r['path'] and o['batch'] == r['batch']), None)
        r['speedup'] = base['ms'] / r['ms'] if base else None
        r['speedup_with_decode'] = base['ms_with_decode'] / r['ms_with_decode'] if base else None
    return device, dtype, results


# ----------------------------------------------------------------------------- simulating (no GPU)

TIMED = ('ms', 'ms_min', 'ms_max', 'ms_with_decode', 'ms_with_decode_min', 'ms_with_decode_max', 'images_per_s',
         'images_per_s_with_decode', 'tflops', 'tflops_with_decode', 'speedup', 'speedup_with_decode', 'scale_ms')


def check_simulate(args):
    if args.fit is not None and not args.simulate:
        raise UserError('--fit needs --simulate (it simulates many batch sizes)')
    if args.fit is not None and min(args.fit) <= 0:
        raise UserError(f'--fit must be > 0 GB, got {min(args.fit):g}')
    if args.finetune is not None and not args.simulate:
        raise UserError('--finetune needs --simulate')
    if not args.simulate:
        return
    if args.finetune is not None:
        from training.losses import ROLES
        if not args.finetune or set(args.finetune) - set(ROLES):
            raise UserError(f'--finetune takes roles among {", ".join(ROLES)}')
        if not 1 <= args.draft_steps <= 9 or args.world_size < 2:
            raise UserError('--draft_steps must be in 1-9 and --world_size >= 2')
    given = [f for f in ('device', 'drafter_ckpt', 'refiner_ckpt', 'vae_ckpt', 'plot', 'peak_tflops') if getattr(args, f)]
    if args.compile:
        given.append('compile')
    if given:
        raise UserError(f'--simulate runs on fake CUDA tensors at the real sizes, without timings or weights; drop --{given[0]}')
    for text in args.schedule:
        if any(hub_depth(spec) is None for spec, _ in parse_schedule(text, hub=False)):
            raise UserError(f'--simulate: --schedule {text} names a checkpoint file; give depths (dNN) only')
    args.random_weights = True


def largest_batch(peak, capacity, known):
    """The largest batch B with peak(B) <= capacity (0: not even 1), peak growing with B. known: {B: peak}
    already simulated. The first try is where the two largest known batches' line crosses capacity (the
    peak is close to affine in B); then steps of 1, 2, 4 ... away from it, and bisection."""
    def fits(B):
        if B not in known:
            known[B] = peak(B)
        return known[B] <= capacity
    sizes = sorted(known)
    guess = sizes[-1]
    if len(sizes) >= 2 and known[sizes[-1]] > known[sizes[-2]]:
        a, b = sizes[-2], sizes[-1]
        guess = b + math.floor((capacity - known[b]) * (b - a) / (known[b] - known[a]))
    lo = max([B for B in known if known[B] <= capacity], default=0)  # fits (0: trivially)
    hi = min([B for B in known if known[B] > capacity], default=None)  # does not
    probe, step = min(max(guess, lo + 1), hi - 1) if hi is not None else max(guess, lo + 1), 1
    while hi is None or hi - lo > 1:
        fit = fits(probe)
        lo, hi = (probe, hi) if fit else (lo, probe)
        nxt = probe + step if fit else probe - step
        probe = nxt if lo < nxt and (hi is None or nxt < hi) else (lo + hi) // 2
        step *= 2
    return lo


def simulate(args):
    """Every mode and batch size on fake CUDA tensors (utils/simulate.py); with --fit, the largest batches."""
    dtype = DTYPES[args.dtype or 'fp16']
    device = torch.device('cuda')
    results, fits = [], []
    with sim.fake_cuda():
        for path in args.paths:
            vae, schedules = build(args, device, dtype if path == 'fast' else torch.float32)
            for mode, schedule in schedules.items():
                def peaks(B):
                    return sim.sampling_memory(schedule, vae, B, dtype, fast=path == 'fast',
                                               **({} if path == 'fast' else dict(decode_chunk=None)))
                known = {}
                for B in args.batch_sizes:
                    sampled, decoded = peaks(B)
                    known[B] = decoded['total']
                    r = describe(mode, path, B, schedule, vae)
                    r.update(dict.fromkeys(TIMED), simulated=True, params_mib=decoded['params'] / MiB,
                             kv_cache_mib=decoded['kv_cache'] / MiB, running_mib=decoded['rest'] / MiB, peak_mib=decoded['total'] / MiB,
                             peak_sampling_mib=sampled['total'] / MiB,
                             sampling_split_mib={k: v / MiB for k, v in sampled.items() if k != 'total'})
                    results.append(r)
                    print(f'  simulated {path} {mode} batch {B}: {decoded["total"] / sim.GB:.2f} GB', file=sys.stderr, flush=True)
                for gb in args.fit or []:  # the peaks simulated so far guide the next search
                    B = largest_batch(lambda b: peaks(b)[1]['total'], gb * sim.GB, known)
                    fits.append(dict(mode=mode, path=path, fit_gb=gb, largest_batch=B, peak_mib=known.get(B, 0) / MiB))
                    print(f'  {path} {mode}: batch {B} fits in {gb:g} GB', file=sys.stderr, flush=True)
            del vae, schedules
    return dtype, results, fits


# ----------------------------------------------------------------------------- reporting

def fmt(x, spec):
    """format(x, spec), or a dash as wide when there is no figure (memory split on a CPU, speedup without 'original')."""
    return format(x, spec) if x is not None else format('-', '>' + spec.split('.')[0])


def print_tables(results, args):
    w = max(8, *(len(r['mode']) for r in results))
    print('Latency per batch (median over repeats, [min, max]); decode = the VQVAE decode included')
    head = f'{"mode":>{w}} {"path":>15} {"batch":>5} | {"ms":>9} {"[min, max]":>19} {"img/s":>8} {"speedup":>7} {"TFLOP/s":>8}'
    head += f' {"%peak":>6}' if args.peak_tflops else ''
    head += f' | {"ms+dec":>9} {"img/s":>8} {"speedup":>7} | {"params":>8} {"KV":>8} {"running":>8} {"peak MiB":>8}'
    print(head)
    for r in results:
        spread = f'[{r["ms_min"]:.1f}, {r["ms_max"]:.1f}]'
        line = (f'{r["mode"]:>{w}} {r["path"]:>15} {r["batch"]:>5} | {r["ms"]:9.1f} {spread:>19} '
                f'{r["images_per_s"]:8.2f} {fmt(r["speedup"], "7.2f")} {r["tflops"]:8.2f}')
        line += f' {100 * r["peak_share"]:5.1f}%' if args.peak_tflops else ''
        line += (f' | {r["ms_with_decode"]:9.1f} {r["images_per_s_with_decode"]:8.2f} {fmt(r["speedup_with_decode"], "7.2f")} | '
                 f'{r["params_mib"]:8.0f} {r["kv_cache_mib"]:8.0f} {fmt(r["running_mib"], "8.0f")} {fmt(r["peak_mib"], "8.0f")}')
        print(line)
    print('\nTime per scale, ms (median); p = prefill of scales an earlier model decided')
    for r in results:
        cells = ' '.join(f'{s["role"][0]}{s["scale"]}{"p" if s["prefill"] else ""}:{s["ms"]:.1f}' for s in r['scale_ms'])
        print(f'{r["mode"]:>{w}} {r["path"]:>15} {r["batch"]:>5} | {cells}')


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys((r['mode'], r['path']) for r in results):
        rows = [r for r in results if (r['mode'], r['path']) == key]
        name = 'VAR (drafter alone)' if key[0] == 'original' else f'CoDe N={key[0]}' if key[0].isdigit() else key[0]
        label = name + ('' if key[1] == 'fast' else f' ({key[1]})')
        ax.plot([r['batch'] for r in rows], [r['ms'] / 1000 for r in rows], marker='o', label=label)
    ax.set_xscale('log', base=2)  # batch sizes are 1, 2, 4 ... 64: even steps, and ticks at the sizes measured
    sizes = sorted({r['batch'] for r in results})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel('batch size')
    ax.set_ylabel('latency per batch, s (decode excluded)')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return ax


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def simulate_finetune(args):
    """Per-GPU memory of fine-tuning (utils.simulate.finetune_memory) for every role, DDP and FSDP2, without and
    with --grad_ckpt, at each per-GPU batch; the models finetune_CoDe.py trains by default (the drafter role's
    student and every teacher VAR-d{--drafter_depth}, the other students VAR-d{--refiner_depth}), fp32, bf16 autocast."""
    var = lambda depth: VAR(depth=depth, embed_dim=64 * depth, num_heads=depth)
    rows = []
    for role in args.finetune:
        for B in args.batch_sizes:
            for fsdp in (False, True):
                for grad_ckpt in (False, True):
                    with sim.fake_cpu():
                        student = var(args.drafter_depth if role == 'drafter' else args.refiner_depth).train()
                        teacher = None if role == 'drafter' else var(args.drafter_depth).eval().requires_grad_(False)
                        vae = VQVAE(ch=args.vae_ch).eval().requires_grad_(False)
                        parts = sim.finetune_memory(role, args.draft_steps, B, args.world_size, fsdp, grad_ckpt, student, teacher, vae)
                    rows.append(dict(role=role, student=f'VAR-d{student.depth}', teacher=teacher and f'VAR-d{teacher.depth}',
                                     draft_steps=args.draft_steps, batch_per_gpu=B, world_size=args.world_size,
                                     parallel='FSDP2' if fsdp else 'DDP', grad_ckpt=grad_ckpt, simulated=True,
                                     **{f'{k}_mib': v / MiB for k, v in parts.items()}))
                    print(f'  simulated {role} batch {B} {rows[-1]["parallel"]}{" grad_ckpt" if grad_ckpt else ""}: '
                          f'{parts["total"] / sim.GB:.1f} GB', file=sys.stderr, flush=True)
    return rows


def print_finetune(rows):
    gb = lambda mib: mib * MiB / sim.GB
    print(f'Simulated fine-tuning memory per GPU, GB (1e9 bytes): {rows[0]["world_size"]} processes (FSDP2: a fake process group), '
          'fp32 weights and AdamW state, bf16 autocast, one step of forward, backward, clipping and AdamW')
    print(f'{"role":>8} {"student":>8} {"teacher":>8} {"batch":>5} {"":>15} | {"weights":>7} {"gathered":>8} {"grads":>7} {"AdamW":>7} '
          f'{"frozen":>7} {"activ.":>7} | {"total":>7}')
    for r in rows:
        how = r['parallel'] + (' --grad_ckpt' if r['grad_ckpt'] else '')
        print(f'{r["role"]:>8} {r["student"]:>8} {r["teacher"] or "-":>8} {r["batch_per_gpu"]:>5} {how:>15} | {gb(r["weights_mib"]):7.2f} '
              f'{gb(r["gathered_mib"]):8.2f} {gb(r["grads_mib"]):7.2f} {gb(r["optimizer_mib"]):7.2f} {gb(r["frozen_mib"]):7.2f} '
              f'{gb(r["activations_mib"]):7.2f} | {gb(r["total_mib"]):7.2f}')
    print('\nfrozen: the teacher and the VQVAE (fp32, replicated); gathered: FSDP2\'s all-gathered blocks in flight; '
          f'activations: what autograd saves, and the step\'s temporaries. Not simulated: {sim.LEFT_OUT}.')


def print_simulated(results, fits, dtype):
    gb = lambda mib: mib * MiB / sim.GB
    w = max(8, *(len(r['mode']) for r in results))
    print(f'Simulated peak GPU memory, GB (1e9 bytes): fake CUDA tensors, {str(dtype).removeprefix("torch.")} autocast, '
          'VAR weights in that dtype on the fast path, fp32 on the straightforward one (the reference\'s)')
    print(f'{"mode":>{w}} {"path":>15} {"batch":>5} | {"sampling":>8} {"params":>7} {"KV":>7} {"rest":>7} | '
          f'{"+decode":>8} {"params":>7} {"KV":>7} {"rest":>7}')
    for r in results:
        part = r['sampling_split_mib']
        print(f'{r["mode"]:>{w}} {r["path"]:>15} {r["batch"]:>5} | {gb(r["peak_sampling_mib"]):8.2f} {gb(part["params"]):7.2f} '
              f'{gb(part["kv_cache"]):7.2f} {gb(part["rest"]):7.2f} | {gb(r["peak_mib"]):8.2f} {gb(r["params_mib"]):7.2f} '
              f'{gb(r["kv_cache_mib"]):7.2f} {gb(r["running_mib"]):7.2f}')
    if fits:
        sizes = list(dict.fromkeys(f['fit_gb'] for f in fits))
        print('\nLargest batch whose peak, decode included, fits in (its peak, GB)')
        print(f'{"mode":>{w}} {"path":>15} | ' + ' '.join(format(f'{size:g} GB', '>15') for size in sizes))
        for key in dict.fromkeys((f['mode'], f['path']) for f in fits):
            cells = [next(f for f in fits if (f['mode'], f['path'], f['fit_gb']) == (*key, size)) for size in sizes]
            print(f'{key[0]:>{w}} {key[1]:>15} | ' + ' '.join(format('%d (%.2f)' % (c['largest_batch'], gb(c['peak_mib'])), '>15') for c in cells))
    print(f'\nNot simulated (a GPU adds them): {sim.LEFT_OUT}.')


def main():
    args = parser().parse_args()
    check_simulate(args)
    check(args)
    if args.simulate and args.finetune:
        results = simulate_finetune(args)
        meta = dict(device='simulated: fake tensors (no GPU)', simulated=True, left_out=sim.LEFT_OUT, torch=torch.__version__,
                    dtype='bfloat16', command=' '.join(['python'] + sys.argv))
        print_finetune(results)
        report = dict(meta=meta, finetune=results)
    elif args.simulate:
        dtype, results, fits = simulate(args)
        meta = dict(device='simulated: fake CUDA tensors (no GPU)', simulated=True, left_out=sim.LEFT_OUT, torch=torch.__version__,
                    dtype=str(dtype).removeprefix('torch.'), compile=False, command=' '.join(['python'] + sys.argv), random_weights=True)
        print_simulated(results, fits, dtype)
        report = dict(meta=meta, results=results, fits=fits)
    else:
        args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        device, dtype, results = run(args)
        meta = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU: {cpu_name()}, {torch.get_num_threads()} threads',
                    simulated=False, torch=torch.__version__, dtype=str(dtype).removeprefix('torch.'),
                    compile=args.compile, command=' '.join(['python'] + sys.argv), random_weights=args.random_weights)
        print_tables(results, args)
        report = dict(meta=meta, results=results)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
        print(f'\nresults saved to {args.json}')
    if args.plot:
        plot(results, args.plot)
        print(f'plot saved to {args.plot}')


if __name__ == '__main__':
    main_guard(main)
