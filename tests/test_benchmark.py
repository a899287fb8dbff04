"""benchmark.py's counting (FLOPs, cache bytes) against independent counts, and a small run end to end.
Speed itself is measured by benchmark.py, never asserted here."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import benchmark
from conftest import run_main, user_error
from models import VAR, VQVAE, Stage, code_schedule, generate


def math_attention(q, k, v, scale=None, **_):
    """Attention as plain matmuls, so that FlopCounterMode counts it (it does not see the CPU kernel)."""
    return ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v


@pytest.mark.parametrize('n', [10, 8, 3, 'cascade'])
def test_flop_formula_equals_torchs_count_of_a_real_run(models, monkeypatch, n):
    vae, drafter, refiner = models
    schedule = [Stage(drafter, 4), Stage(refiner, 7), Stage(drafter, 10)] if n == 'cascade' else code_schedule(drafter, refiner, n)
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', math_attention)
    with FlopCounterMode(display=False) as counter:
        generate(schedule, vae, torch.tensor([1, 2, 3]), seed=0, cfg=1.5, top_k=600, top_p=0.96)
    assert benchmark.sampling_flops(schedule, 3)['total'] == counter.get_total_flops()


def test_real_size_flops_match_the_architectures_floor():
    """Per 256x256 image, both CFG halves: VAR-d30 3.79 TFLOP, CoDe N=8 1.98 (drafter 1.38 +
    refiner 0.60), N=6 1.09, VQVAE decode 0.39 (the figures worked out in the fast-path issue)."""
    with torch.device('meta'):
        d30, d16 = VAR(depth=30, embed_dim=1920, num_heads=30), VAR(depth=16, embed_dim=1024, num_heads=16)
        vae = VQVAE()
    tflop = lambda schedule: benchmark.sampling_flops(schedule, 1)['total'] / 1e12
    assert tflop([Stage(d30, 10)]) == pytest.approx(3.79, rel=0.01)
    assert tflop(code_schedule(d30, d16, 8)) == pytest.approx(1.98, rel=0.01)
    assert tflop([Stage(d30, 8)]) == pytest.approx(1.38, rel=0.01)
    assert tflop(code_schedule(d30, d16, 6)) == pytest.approx(1.09, rel=0.01)
    assert benchmark.decode_flops(vae, 1) / 1e12 == pytest.approx(0.39, rel=0.01)
    assert benchmark.decode_flops(vae, 4) == 4 * benchmark.decode_flops(vae, 1)


def test_kv_cache_figure_is_the_largest_cache_alive(models, monkeypatch):
    vae, drafter, refiner = models
    from models import var as var_module
    sizes = []
    original = var_module.KVCache.__init__

    def record(self, *a):
        original(self, *a)
        sizes.append(self.nbytes)

    monkeypatch.setattr(var_module.KVCache, '__init__', record)
    schedule = code_schedule(drafter, refiner, 7)
    generate(schedule, vae, torch.tensor([4, 5]), seed=0, cfg=1.5, top_k=600, top_p=0.96)
    assert benchmark.kv_cache_bytes(schedule, 2, torch.float32) == max(sizes)


def test_benchmark_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    out = tmp_path / 'b.json'
    capsys.readouterr()
    run_main(benchmark, ['--random_weights', '--device', 'cpu', '--drafter_depth', '2', '--refiner_depth', '1', '--vae_ch', '32',
                         '--batch_sizes', '1', '--modes', 'original,8', '--warmup', '0', '--repeats', '1', '--paths', 'fast,straightforward',
                         '--json', str(out), '--schedule', 'd2:6,d3:8,d1'])
    stdout = capsys.readouterr().out
    assert stdout.startswith('Latency per batch')
    assert '"results"' not in stdout and stdout.rstrip().endswith(f'results saved to {out}'), 'tables on screen, JSON in the file'
    report = json.loads(out.read_text())
    rows = report['results']
    cascade = 'd2:6,d3:8,d1'
    assert [(x['path'], x['mode'], x['batch']) for x in rows] == [
        (path, mode, 1) for path in ('fast', 'straightforward') for mode in ('original', '8', cascade)]
    for i, x in enumerate(rows):
        assert x['ms_min'] <= x['ms'] <= x['ms_max'] and x['ms_with_decode'] > x['ms']
        assert x['images_per_s'] == pytest.approx(1 / x['ms'] * 1000)
        assert x['speedup'] == pytest.approx(rows[i - i % 3]['ms'] / x['ms'])
        roles = [(s['model'], s['role'], s['scale'], s['prefill']) for s in x['scale_ms']]
        if x['mode'] == 'original':
            assert roles == [('VAR-d2', 'drafter', si, False) for si in range(10)]
        elif x['mode'] == '8':
            assert roles == [('VAR-d2', 'drafter', si, False) for si in range(8)] + [('VAR-d1', 'refiner', si, si < 8) for si in range(10)]
        else:
            assert roles == ([('VAR-d2', 'drafter', si, False) for si in range(6)] + [('VAR-d3', 'middle', si, si < 6) for si in range(8)]
                             + [('VAR-d1', 'refiner', si, si < 8) for si in range(10)])
    assert rows[2]['models'] == ['VAR-d2 scales 0-5', 'VAR-d3 scales 6-7', 'VAR-d1 scales 8-9']
    assert report['meta']['torch'] == torch.__version__


@pytest.mark.parametrize('args,message', [(['--modes', 'original,12'], "'12' is neither"),
                                          (['--paths', 'slow'], '--paths takes'),
                                          (['--batch_sizes', '0'], 'must be positive'),
                                          (['--json', '/no/such/dir/b.json'], 'does not exist'),
                                          (['--plot', 'p.pdfx'], 'unknown image type')])
def test_benchmark_bad_input(args, message, capsys):
    assert message in user_error(benchmark, ['--random_weights', '--device', 'cpu', *args], capsys)


def test_plot_has_a_log2_batch_axis_with_the_sizes_measured(tmp_path):
    rows = [dict(mode=m, path='fast', batch=b, ms=b * (2 if m == 'original' else 1)) for m in ('original', '8') for b in (1, 4, 16, 64)]
    ax = benchmark.plot(rows, str(tmp_path / 'p.png'))
    assert ax.get_xscale() == 'log' and [t.get_text() for t in ax.get_xticklabels()] == ['1', '4', '16', '64']
    assert (tmp_path / 'p.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert [line.get_label() for line in ax.get_lines()] == ['VAR (drafter alone)', 'CoDe N=8']
