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
from models.var import compile_steps
from utils.checkpoints import hub_depth, load_vae, load_var, parse_schedule, vae_path, var_path
from utils.cli import CODE_TEMP, DTYPES, Parser, autocast, check_writable, comma_list, main_guard, runtime
from utils.io import check_image_path
from utils.errors import UserError
from utils.timing import Clock, reset_peak_memory

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
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda, cuda:N or cpu (default: cuda if available)')
    p.add_argument('--dtype', choices=list(DTYPES), default=None, help='autocast precision (default fp16 on CUDA, fp32 on CPU)')
    p.add_argument('--compile', action='store_true', help='CUDA graphs per scale (torch.compile reduce-overhead); off on CPU')
    p.add_argument('--paths', type=comma_list(str, '--paths'), default='fast',
                   help="'fast' (default) and/or 'straightforward' (the reference's growing cache, per-scale AdaLN, full-vocabulary sampling)")
    p.add_argument('--warmup', type=int, default=1, help='untimed runs first, per mode and batch size (default 1)')
    p.add_argument('--repeats', type=int, default=5, help='timed runs, per mode and batch size (default 5)')
    p.add_argument('--peak_tflops', type=float, default=None, help="the device's peak, for the share achieved (e.g. 800 for an H100 in bf16)")
    p.add_argument('--json', default=None, help='write every figure (and the command, device, torch version) here as JSON')
    p.add_argument('--plot', default=None, help='latency against batch size per mode, as a PNG (needs matplotlib)')
    return p


def check(args):
    for m in args.modes:
        if m != 'original' and not (m.isdigit() and 1 <= int(m) <= 9):
            raise UserError(f"--modes: {m!r} is neither 'original' nor a number of draft steps 1-9")
    for text in args.schedule:
        parse_schedule(text, hub=not args.random_weights)
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


def build(args, device):
    """The VQVAE and {mode: schedule}; every model is built or loaded once, by name: a depth dNN (random
    weights, or the official var_dNN.pth) or a checkpoint path."""
    vae = random_model(VQVAE, device, 0, ch=args.vae_ch) if args.random_weights else load_vae(vae_path(args.vae_ckpt), device)
    models = {}

    def model(spec):
        if spec not in models:
            depth = hub_depth(spec)
            if depth is not None and args.random_weights:
                models[spec] = random_model(VAR, device, depth, depth=depth, embed_dim=64 * depth, num_heads=depth)
            else:
                models[spec] = load_var(spec if depth is None else var_path(None, depth, '--schedule'), device)
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
    labels = (torch.arange(B, device=device) * 37) % 1000
    kw = dict(seed=0, cfg=1.5, top_k=600, top_p=0.96, temp=[float(t) for t in CODE_TEMP.split(',')], fast=fast)
    records = []

    def once():
        clock = Clock(device)
        scale_marks = []
        start = clock.mark()
        _, f_hat = generate(schedule, vae, labels, on_scale=lambda stage, si, prefill: scale_marks.append((stage, si, prefill, clock.mark())), **kw)
        sampled = clock.mark()
        vae.decode(f_hat)
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
        for _ in range(args.repeats):
            records.append(once())
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
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


def run(args):
    device, dtype = runtime(args)
    vae, schedules = build(args, device)
    if args.compile:
        for schedule in schedules.values():
            for stage in schedule:
                compile_steps(stage.model)
    results = []
    for path in args.paths:
        for mode, schedule in schedules.items():
            for B in args.batch_sizes:
                records, peak = measure(schedule, vae, B, args, device, dtype, fast=path == 'fast')
                sample, total, scales = summarise(records)
                flops = sampling_flops(schedule, B, vae.Cvae)
                dflops = decode_flops(vae, B)
                params = param_bytes(vae, *(m for m, _ in schedule))
                kv = kv_cache_bytes(schedule, B, torch.float32 if dtype == torch.float32 else dtype, growing=path == 'straightforward')
                r = dict(mode=mode, path=path, batch=B,
                         models=[f'VAR-d{m.depth} scales {0 if i == 0 else schedule[i - 1].stop}-{stop - 1}' for i, (m, stop) in enumerate(schedule)],
                         ms=statistics.median(sample), ms_min=min(sample), ms_max=max(sample),
                         ms_with_decode=statistics.median(total), ms_with_decode_min=min(total), ms_with_decode_max=max(total),
                         tflop=flops['total'] / 1e12, tflop_decode=dflops / 1e12, tflop_parts={k: v / 1e12 for k, v in flops.items()},
                         params_mib=params / MiB, kv_cache_mib=kv / MiB,
                         peak_mib=None if peak is None else peak / MiB,
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
    for r in results:
        base = next((o for o in results if o['mode'] == 'original' and o['path'] == r['path'] and o['batch'] == r['batch']), None)
        r['speedup'] = base['ms'] / r['ms'] if base else None
        r['speedup_with_decode'] = base['ms_with_decode'] / r['ms_with_decode'] if base else None
    return device, dtype, results


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


def main():
    args = parser().parse_args()
    check(args)
    device, dtype, results = run(args)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU: {cpu_name()}, {torch.get_num_threads()} threads',
                torch=torch.__version__, dtype=str(dtype).removeprefix('torch.'),
                compile=args.compile, command=' '.join(['python'] + sys.argv), random_weights=args.random_weights)
    print_tables(results, args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        print(f'\nresults saved to {args.json}')
    if args.plot:
        plot(results, args.plot)
        print(f'plot saved to {args.plot}')

if __name__ == '__main__':
    main_guard(main)
