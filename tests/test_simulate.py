"""The memory simulation (utils/simulate.py, benchmark.py --simulate): the tracker against bytes counted by
hand, the split against the models' sizes and the KV cache formula, the largest-batch search, the JSON
beside a measured run's, and the fine-tuning figures against FSDP2's sharding rule."""
import json
import math

import pytest
import torch

import benchmark
import tiny
from conftest import run_main, user_error
from models import VAR, VQVAE, Stage, generate
from models.var import hold_weights_in
from utils import simulate as sim

CUDA = torch.device('cuda')


def test_tracker_counts_allocator_blocks_until_freed():
    with sim.fake_cuda():
        tracker = sim.MemoryTracker()
        with tracker:
            a = torch.empty(1000, device=CUDA)                      # 4000 bytes: 8 blocks of 512
            with tracker.counting_as('kv'):
                b = torch.empty(100, dtype=torch.float16, device=CUDA)  # 200 bytes: one block
            c = a[:10]                                             # a view: no new storage
            del a
            assert tracker.now == {'rest': 4096, 'kv': 512}, 'the view keeps the storage'
            del c
            d = torch.empty(10, device=CUDA)
        assert tracker.peak == 4096 + 512 and tracker.at_peak == {'rest': 4096, 'kv': 512}
        assert sim.split(tracker, at_peak=False) == dict(params=0, kv_cache=512, rest=512, total=1024)
        del b, d


def test_sampling_split_is_the_models_and_the_cache_formula(models):
    """Parameters: every weight and buffer of the models, each rounded up to 512 bytes; KV cache at the
    peak: the one cache alive, as benchmark.kv_cache_bytes counts it; held in fp16, the VAR weights halve."""
    with sim.fake_cuda():
        with CUDA:
            vae, drafter = tiny.tiny_vae(), tiny.tiny_drafter()
        rounded = lambda m: sum(-(-t.untyped_storage().nbytes() // 512) * 512 for t in list(m.parameters()) + list(m.buffers()))
        fp32 = rounded(vae) + rounded(drafter)
        for dtype in (torch.float32, torch.float16):
            hold_weights_in(drafter, dtype)
            sampled, decoded = sim.sampling_memory([Stage(drafter, 10)], vae, 3, torch.float16)
            assert sampled['params'] == rounded(vae) + rounded(drafter) and decoded['total'] >= sampled['total']
            assert sampled['kv_cache'] == benchmark.kv_cache_bytes([Stage(drafter, 10)], 3, torch.float16) == 2 * 2 * 3 * 2 * 424 * 128 * 2
        assert rounded(vae) + rounded(drafter) < fp32 - 0.45 * rounded(drafter)
        growing, _ = sim.sampling_memory([Stage(drafter, 10)], vae, 3, torch.float16, fast=False)
        assert growing['kv_cache'] > 2 * 2 * 6 * 680 * 128 * 2, 'the reference keeps all 680 positions of both blocks, and copies'


def test_largest_batch_finds_the_boundary_in_few_simulations():
    """The peak is nearly affine in the batch (here with a step, as where the peak moves to another scale)."""
    calls = []
    exact = lambda B: 5e9 + 0.12e9 * B + (0.3e9 if B > 100 else 0)
    known = {16: exact(16), 64: exact(64)}
    B = benchmark.largest_batch(lambda B: (calls.append(B), exact(B))[1], 24e9, known)
    assert B == max(b for b in range(1000) if exact(b) <= 24e9) == 155
    assert len(calls) <= 4


def test_simulate_reports_the_measured_keys_and_the_fit(tmp_path, capsys):
    small = ['--drafter_depth', '2', '--refiner_depth', '1', '--vae_ch', '32', '--modes', 'original']
    run_main(benchmark, ['--random_weights', '--device', 'cpu', '--repeats', '1', '--warmup', '0', *small, '--batch_sizes', '1',
                         '--json', str(tmp_path / 'm.json')])
    run_main(benchmark, ['--simulate', *small, '--batch_sizes', '1,8', '--fit', '0.1,0.2', '--json', str(tmp_path / 's.json')])
    out = capsys.readouterr().out
    assert 'Simulated peak GPU memory' in out and sim.LEFT_OUT in out
    (measured,), report = json.loads((tmp_path / 'm.json').read_text())['results'], json.loads((tmp_path / 's.json').read_text())
    rows, (fit, roomier) = report['results'], report['fits']
    assert report['meta']['simulated'] is True and [r['batch'] for r in rows] == [1, 8]
    assert set(measured) <= set(rows[0]) and measured['tflop'] == rows[0]['tflop']
    for r in rows:
        assert r['simulated'] and r['ms'] is None and r['peak_mib'] >= r['peak_sampling_mib'] > r['params_mib'] > 0
        assert r['params_mib'] + r['kv_cache_mib'] + r['running_mib'] == pytest.approx(r['peak_mib'])
    # the fit: its peak within 0.1 GB, one more image over it
    B = fit['largest_batch']
    assert rows[0]['peak_mib'] * 2 ** 20 <= fit['peak_mib'] * 2 ** 20 <= 0.1e9 < rows[1]['peak_mib'] * 2 ** 20 and 1 <= B < 8
    with sim.fake_cuda():
        vae, schedules = benchmark.build(benchmark.parser().parse_args(['--simulate', '--random_weights', *small]), CUDA, torch.float16)
        assert sim.sampling_memory(schedules['original'], vae, B + 1, torch.float16)[1]['total'] > 0.1e9
    assert roomier['fit_gb'] == 0.2 and B <= roomier['largest_batch'] < 8 and roomier['peak_mib'] * 2 ** 20 <= 0.2e9


def test_attention_takes_the_kernels_a_gpu_takes():
    """Without a driver PyTorch would take the math kernel (the whole score matrix, in fp32); the simulation takes
    flash attention (half precision, no mask) and the memory-efficient kernel (a mask), which hold the output
    and the log-sum-exp only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with sim.fake_cuda():
        q = torch.empty(2, 4, 256, 64, dtype=torch.float16, device=CUDA)
        k = v = torch.empty(2, 4, 680, 64, dtype=torch.float16, device=CUDA)
        mask = torch.ones(256, 680, dtype=torch.bool, device=CUDA)
        for attn_mask, kernel in ((None, '_scaled_dot_product_flash_attention'), (mask, '_scaled_dot_product_efficient_attention')):
            tracker, ops = sim.MemoryTracker(), Ops()
            with tracker, ops:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
            assert kernel + '.default' in ops.names and 'bmm.default' not in ops.names
            assert out.shape == q.shape and out.dtype == torch.float16
            scores = 2 * 4 * 256 * 680 * 4
            assert tracker.peak < scores / 2, 'no score matrix held'


@pytest.mark.parametrize('fsdp', [False, True], ids=['ddp', 'fsdp2'])
def test_finetune_memory_holds_what_ddp_and_fsdp2_hold(fsdp):
    """DDP: the weights, gradients and AdamW's two moments of the whole student, fp32. FSDP2 over 8
    processes: their shards, each parameter cut along its first dimension into 8 padded chunks."""
    world = 8
    with sim.fake_cpu():
        student = VAR(depth=2, embed_dim=128, num_heads=2).train()
        teacher = VAR(depth=1, embed_dim=64, num_heads=1).eval().requires_grad_(False)
        vae = VQVAE(ch=32).eval().requires_grad_(False)
        shapes = [tuple(p.shape) for p in student.parameters()]
        frozen = sum(p.numel() * 4 for m in (teacher, vae) for p in m.parameters())
        parts = sim.finetune_memory('all', 8, 2, world, fsdp, False, student, teacher, vae)
    if fsdp:
        full = sum(math.ceil(s[0] / world) * math.prod(s[1:]) * 4 for s in shapes)
    else:
        full = sum(math.prod(s) * 4 for s in shapes)
    assert parts['optimizer'] == pytest.approx(2 * full, rel=0.02, abs=2 * 512 * len(shapes))
    assert parts['weights'] == pytest.approx(full, rel=0.02, abs=512 * len(shapes))
    assert parts['frozen'] == frozen and parts['activations'] > 0
    if not fsdp:  # DDP's buckets hold the gradients throughout
        assert parts['grads'] == pytest.approx(full, rel=0.02, abs=512 * len(shapes))
    assert parts['gathered'] > 0 if fsdp else parts['gathered'] == 0
    assert parts['total'] == sum(v for k, v in parts.items() if k != 'total')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_on_a_gpu_the_simulated_peak_is_the_measured_one():
    """VAR-d16 at its real size, fp16, batch 16, sampling and decode: max_memory_allocated above what was there
    before the models, against the simulation of the same run (within 5% and 256 MiB: cuBLAS's workspace and
    kernels' own buffers, which the simulation leaves out, go through the same allocator)."""
    with sim.fake_cuda():
        with CUDA:
            vae, var = VQVAE().eval().requires_grad_(False), VAR(depth=16, embed_dim=1024, num_heads=16).eval().requires_grad_(False)
        hold_weights_in(var, torch.float16)
        simulated = sim.sampling_memory([Stage(var, 10)], vae, 16, torch.float16)[1]['total']
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with CUDA:
        vae, var = VQVAE().eval().requires_grad_(False), VAR(depth=16, embed_dim=1024, num_heads=16).eval().requires_grad_(False)
    hold_weights_in(var, torch.float16)
    with torch.inference_mode(), torch.autocast('cuda', dtype=torch.float16):
        _, f_hat = generate([Stage(var, 10)], vae, torch.arange(16, device=CUDA), seed=0, cfg=1.5, top_k=600, top_p=0.96, temp=1.0)
        vae.decode(f_hat)
    measured = torch.cuda.max_memory_allocated() - before
    assert abs(measured - simulated) <= 0.05 * simulated + 256 * 2 ** 20, (measured / 2 ** 20, simulated / 2 ** 20)


@pytest.mark.parametrize('args,message', [(['--simulate', '--device', 'cpu'], 'drop --device'), (['--fit', '24'], '--fit needs --simulate'),
                                          (['--simulate', '--fit', '0'], '--fit must be > 0'),
                                          (['--simulate', '--schedule', 'my.pth:6,d16'], 'names a checkpoint file'),
                                          (['--simulate', '--finetune', 'drafter,foo'], '--finetune takes roles'),
                                          (['--finetune', 'drafter'], '--finetune needs --simulate')])
def test_simulate_bad_input(args, message, capsys):
    assert message in user_error(benchmark, args, capsys)
