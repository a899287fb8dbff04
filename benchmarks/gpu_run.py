"""The one command a session lent a GPU runs: every GPU figure this project lacks, into one folder of JSON.

    benchmarks/gpu_run.sh OUT            # on an H100/H200: at most 8 minutes (--budget), random weights at real sizes
    benchmarks/gpu_run.sh OUT --smoke    # the same steps at tiny sizes on the CPU, in under a minute (tests/test_gpu_run.py)

Steps, in this order (the compiled tables last, in the time left):
  env         torch, CUDA, the GPU
  simulate    (on the CPU, beside the GPU steps) benchmark.py --simulate of the benchmarked configurations, and the
              fine-tuning memory of the measured fine-tuning steps
  tests       the GPU-only tests (skipped without a GPU)
  bench       benchmark.py: original, CoDe 8 and 6 at batch 1, 16, 64, eager; peak memory beside the simulated
  sample      a 2,000-image sample_CoDe.py run under torchrun --nproc_per_node=1 (NCCL), from random-weight
              checkpoints at real sizes written first
  finetune    a few fine-tuning steps at real sizes, drafter and refiner roles, bf16, without and with
              --grad_ckpt: images/s and peak memory, beside the simulated
  compile     benchmark.py --compile, one mode and batch size per run, 64 first, while time is left
Each step's failure is reported (in OUT/gpu_run.json and on the screen) and the others still run, so one failure
does not waste the lease; the exit status is 1 if any step failed. OUT receives three files: gpu_run.json (every
figure), gpu_run.log (every step's output) and summary.txt; the work files (checkpoints, samples) go to --work.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GPU_TESTS = ['tests/test_fast_path.py::test_no_host_sync_inside_the_loop',
             'tests/test_fast_path.py::test_on_a_gpu_held_weights_sample_what_autocast_samples',
             'tests/test_cli.py::test_on_a_gpu_fp16_is_the_default_and_fp32_is_exact_fp32',
             'tests/test_cli.py::test_on_a_gpu_compile_samples_the_eager_tokens_and_peak_memory_is_reported',
             'tests/test_simulate.py::test_on_a_gpu_the_simulated_peak_is_the_measured_one']


class Sizes:
    """Real sizes on a GPU; tiny ones for --smoke."""

    def __init__(self, smoke):
        self.smoke = smoke
        self.models = (['--drafter_depth', '2', '--refiner_depth', '1', '--vae_ch', '32'] if smoke else [])
        self.depths = (2, 1, 32) if smoke else (30, 16, 160)  # drafter, refiner, VQVAE width
        self.batches = '1' if smoke else '1,16,64'
        self.modes = 'original,8' if smoke else 'original,8,6'
        self.roles = 'drafter' if smoke else 'drafter,refiner'  # simulated fine-tuning
        self.bench = ['--repeats', '1', '--warmup', '0'] if smoke else ['--repeats', '3', '--warmup', '1']
        self.images_per_class, self.classes = (1, '0-3') if smoke else (2, '0-999')  # 2,000 images on a GPU
        self.finetune_batch, self.finetune_steps = (2, 2) if smoke else (32, 6)
        self.compile = [('8', 2)] if smoke else [(m, b) for b in (64, 16, 1) for m in ('8', 'original', '6')]


class Run:
    def __init__(self, out, work, budget):
        self.out, self.work, self.deadline = out, work, time.monotonic() + budget
        self.steps, self.figures = [], {}
        self.log = open(os.path.join(out, 'gpu_run.log'), 'w')
        self.lock = threading.Lock()

    def left(self):
        return self.deadline - time.monotonic()

    def say(self, text):
        with self.lock:
            print(text, flush=True)
            self.log.write(text + '\n')
            self.log.flush()

    def command(self, name, argv, timeout, env=None):
        """Run argv (from the repo root), its output into the log; returns its output if it exited 0, else None."""
        timeout = max(1, min(timeout, self.left()))
        start = time.monotonic()
        try:
            p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
            status, output = ('ok' if p.returncode == 0 else f'exit status {p.returncode}'), p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            status = f'timed out after {timeout:.0f} s'
            output = ''.join(x.decode(errors='replace') if isinstance(x, bytes) else (x or '') for x in (e.stdout, e.stderr))
        seconds = time.monotonic() - start
        with self.lock:
            self.log.write(f'===== {name}: {" ".join(argv)}\n{output}\n===== {name}: {status} in {seconds:.1f} s\n')
            self.log.flush()
        self.record(name, status, seconds, None if status == 'ok' else (output.strip().splitlines() or [''])[-1:])
        return output if status == 'ok' else None

    def record(self, name, status, seconds, error=None):
        with self.lock:
            self.steps.append(dict(step=name, status=status, seconds=round(seconds, 1), error=error[0] if error else None))
        self.say(f'[{name}] {status} ({seconds:.0f} s){": " + error[0][:200] if error else ""}')

    def python(self, name, args, timeout, env=None):
        return self.command(name, [sys.executable, *args], timeout, env)

    def load(self, path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


def step_env(run, sizes):
    code = ('import json, torch; c = torch.cuda.is_available(); print(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda, '
            'available=c, device=torch.cuda.get_device_name() if c else "cpu", '
            'memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if c else None)))')
    output = run.python('env', ['-c', code], 120)
    run.figures['env'] = json.loads(output.strip().splitlines()[-1]) if output else None


def step_simulate(run, sizes):
    """On the CPU, while the GPU steps run: what benchmark.py --simulate predicts for the configurations measured."""
    path, ft_path = os.path.join(run.work, 'simulated.json'), os.path.join(run.work, 'simulated_finetune.json')
    if run.python('simulate', ['benchmark.py', '--simulate', '--modes', sizes.modes, '--batch_sizes', sizes.batches, *sizes.models,
                               '--json', path], 600) is not None:
        run.figures['simulated'] = run.load(path)
    if run.python('simulate_finetune', ['benchmark.py', '--simulate', '--finetune', sizes.roles, '--batch_sizes',
                                        str(sizes.finetune_batch), *sizes.models, '--json', ft_path], 600) is not None:
        run.figures['simulated_finetune'] = run.load(ft_path)


def step_tests(run, sizes):
    run.python('tests', ['-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', *GPU_TESTS], 300)


def step_bench(run, sizes):
    path = os.path.join(run.work, 'bench.json')
    if run.python('bench', ['benchmark.py', '--random_weights', '--modes', sizes.modes, '--batch_sizes', sizes.batches, *sizes.models,
                            *sizes.bench, '--json', path], 300) is not None:
        run.figures['bench'] = run.load(path)


def step_sample(run, sizes):
    """Checkpoints with random weights at the real sizes, then sample_CoDe.py under torchrun (NCCL on a GPU)."""
    folder = os.path.join(run.work, 'checkpoints')
    drafter, refiner, ch = sizes.depths
    code = f'''
import os, sys, torch
sys.path.insert(0, {ROOT!r})
from benchmark import random_model
from models import VAR, VQVAE
from utils.checkpoints import save_var
os.makedirs({folder!r}, exist_ok=True)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # 2B random numbers: faster drawn on a GPU
for name, depth in (("drafter", {drafter}), ("refiner", {refiner})):
    m = random_model(VAR, device, depth, depth=depth, embed_dim=64 * depth, num_heads=depth)
    save_var(m.state_dict(), m, os.path.join({folder!r}, name + ".pth"))  # moved to the host there
    del m
torch.save({{k: v.cpu() for k, v in random_model(VQVAE, device, 0, ch={ch}).state_dict().items()}}, os.path.join({folder!r}, "vae.pth"))
'''
    if run.python('checkpoints', ['-c', code], 300) is None:
        return
    samples = os.path.join(run.work, 'samples')
    start = time.monotonic()
    output = run.python('sample', ['-m', 'torch.distributed.run', '--nproc_per_node=1', 'sample_CoDe.py',
                               '--drafter_ckpt', os.path.join(folder, 'drafter.pth'), '--refiner_ckpt', os.path.join(folder, 'refiner.pth'),
                               '--vae_ckpt', os.path.join(folder, 'vae.pth'), '--draft_steps', '8', '--classes', sizes.classes,
                               '--images_per_class', str(sizes.images_per_class), '--output_path', samples], 420)
    if output is not None:
        import numpy as np
        with np.load(samples + '.npz') as npz:
            n = len(npz['labels'])
        run.figures['sample'] = dict(images=n, seconds_with_startup=time.monotonic() - start, backend='gloo' if sizes.smoke else 'nccl',
                                     done=next((line for line in output.splitlines() if line.startswith('done:')), None))


def step_finetune(run, sizes):
    path = os.path.join(run.work, 'finetune.json')
    drafter, refiner, ch = sizes.depths
    if run.python('finetune', [os.path.abspath(__file__), '--finetune_steps', path, '--depths', f'{drafter},{refiner},{ch}',
                               '--batch', str(sizes.finetune_batch), '--steps', str(sizes.finetune_steps)], 300) is not None:
        run.figures['finetune'] = run.load(path)


def step_compile(run, sizes):
    results = []
    for mode, batch in sizes.compile:
        if run.left() < 30:
            run.record(f'compile {mode} batch {batch}', 'skipped: no time left', 0)
            continue
        path = os.path.join(run.work, f'compile_{mode}_{batch}.json')
        if run.python(f'compile {mode} batch {batch}', ['benchmark.py', '--random_weights', '--compile', '--modes', mode, '--batch_sizes',
                                                         str(batch), *sizes.models, *sizes.bench, '--json', path], run.left() - 10) is not None:
            results += (run.load(path) or {}).get('results', [])
    run.figures['compile'] = results


def finetune_steps(path, depths, batch, steps):
    """A few fine-tuning steps per role, on this machine's GPU (the CPU for --smoke): forward, backward, clipping,
    fused AdamW, the gradients kept between steps (as DDP's buckets keep them, and as the simulation counts them).
    Writes images/s (after the first step) and max_memory_allocated."""
    import torch
    from types import SimpleNamespace
    from benchmark import random_model
    from models import VAR, VQVAE
    from training.losses import role_positions
    from training.loop import step_loss
    from training.schedule import param_groups
    drafter, refiner, ch = depths
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for role in ('drafter', 'refiner'):
        for grad_ckpt in (False, True):
            build = lambda depth: random_model(VAR, device, depth, depth=depth, embed_dim=64 * depth, num_heads=depth)
            student = build(drafter if role == 'drafter' else refiner).train().requires_grad_(True)
            teacher = None if role == 'drafter' else build(drafter)
            vae = random_model(VQVAE, device, 0, ch=ch)
            optimizer = torch.optim.AdamW(param_groups(student, 0.05), lr=1e-6, betas=(0.9, 0.95), fused=cuda)
            positions = role_positions(role, 8, student.begin_ends)
            tokens = torch.randint(0, 4096, (batch, student.L), device=device)
            labels = torch.randint(0, 1001, (batch,), device=device)
            inputs = vae.quantize.teacher_inputs(tokens)
            args = SimpleNamespace(grad_ckpt=grad_ckpt, alpha=0.5, kd_temp=1.0, label_smooth=0.0)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                out = step_loss(student, teacher, labels, tokens, inputs, positions, args,
                                torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32))
                out.loss.backward()
                del out
                torch.nn.utils.clip_grad_norm_(student.parameters(), 2.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            step_s = sorted(times[1:] or times)[len(times[1:] or times) // 2]
            rows.append(dict(role=role, grad_ckpt=grad_ckpt, batch=batch, student=f'VAR-d{student.depth}',
                             teacher=teacher and f'VAR-d{teacher.depth}', dtype=str(dtype).removeprefix('torch.'), steps=steps,
                             step_s=step_s, images_per_s=batch / step_s,
                             peak_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None))
            print(rows[-1], flush=True)
            del student, teacher, vae, optimizer, inputs
            if cuda:
                torch.cuda.empty_cache()
    with open(path, 'w') as f:
        json.dump(rows, f, indent=1)


def side_by_side(figures):
    """Measured peaks beside the simulated ones, for the benchmark rows and the fine-tuning steps."""
    rows = []
    sim = {(r['mode'], r['batch']): r for r in ((figures.get('simulated') or {}).get('results') or [])}
    for r in (figures.get('bench') or {}).get('results') or []:
        s = sim.get((r['mode'], r['batch']))
        if s and r.get('peak_mib'):
            rows.append(dict(what=f'sampling {r["mode"]} batch {r["batch"]}', measured_mib=r['peak_mib'], simulated_mib=s['peak_mib'],
                             measured_over_simulated=r['peak_mib'] / s['peak_mib']))
    ft = {(r['role'], r['grad_ckpt']): r for r in ((figures.get('simulated_finetune') or {}).get('finetune') or []) if r['parallel'] == 'DDP'}
    for r in figures.get('finetune') or []:
        s = ft.get((r['role'], r['grad_ckpt']))
        if s and r.get('peak_mib'):
            rows.append(dict(what=f'fine-tuning {r["role"]}{" grad_ckpt" if r["grad_ckpt"] else ""} batch {r["batch"]}',
                             measured_mib=r['peak_mib'], simulated_mib=s['total_mib'], measured_over_simulated=r['peak_mib'] / s['total_mib']))
    return rows


def guarded(run, name, sizes):
    """Step `name`; an error of the step's own (not of the command it runs) is recorded, and the run goes on."""
    start = time.monotonic()
    try:
        globals()[f'step_{name}'](run, sizes)
    except Exception as e:
        run.record(name, f'error: {type(e).__name__}', time.monotonic() - start, [str(e)])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out', nargs='?', help='folder for gpu_run.json, gpu_run.log and summary.txt')
    p.add_argument('--smoke', action='store_true', help='tiny sizes on the CPU, to check the steps run (CI)')
    p.add_argument('--budget', type=float, default=None, help='seconds for all steps (default 480 on a GPU, 120 with --smoke)')
    p.add_argument('--work', default=None, help='folder for checkpoints and samples (default: a new one in /tmp)')
    p.add_argument('--finetune_steps', default=None, help=argparse.SUPPRESS)  # the finetune step's own process
    p.add_argument('--depths', default=None, help=argparse.SUPPRESS)
    p.add_argument('--batch', type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument('--steps', type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.finetune_steps:
        return finetune_steps(args.finetune_steps, [int(d) for d in args.depths.split(',')], args.batch, args.steps)
    if not args.out:
        p.error('give the output folder OUT')
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix='gpu_run-')
    os.makedirs(work, exist_ok=True)
    sizes = Sizes(args.smoke)
    run = Run(args.out, work, args.budget or (120 if args.smoke else 480))
    run.say(f'gpu_run: {"smoke (tiny sizes)" if args.smoke else "real sizes"}; work files in {work}; {run.left():.0f} s budget')
    start = time.monotonic()
    guarded(run, 'env', sizes)
    simulation = threading.Thread(target=guarded, args=(run, 'simulate', sizes))  # CPU only: beside the GPU steps
    simulation.start()
    for name in ('tests', 'bench', 'sample', 'finetune'):
        guarded(run, name, sizes)
    simulation.join(timeout=max(1, run.left() - 60))
    guarded(run, 'compile', sizes)
    simulation.join()
    figures = dict(run.figures, side_by_side=side_by_side(run.figures))
    report = dict(smoke=args.smoke, seconds=time.monotonic() - start, steps=run.steps, **figures)
    with open(os.path.join(args.out, 'gpu_run.json'), 'w') as f:
        json.dump(report, f, indent=1)
    failed = [s for s in run.steps if s['status'] != 'ok' and not s['status'].startswith('skipped')]
    lines = [f'gpu_run {"smoke " if args.smoke else ""}in {report["seconds"]:.0f} s: {len(run.steps) - len(failed)} of {len(run.steps)} steps ok']
    lines += [f'  {s["step"]}: {s["status"]} ({s["seconds"]} s)' for s in run.steps]
    lines += [f'  {r["what"]}: measured {r["measured_mib"]:.0f} MiB, simulated {r["simulated_mib"]:.0f} MiB ({r["measured_over_simulated"]:.3f}x)'
              for r in figures['side_by_side']]
    with open(os.path.join(args.out, 'summary.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    run.say('\n'.join(lines))
    run.log.close()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
