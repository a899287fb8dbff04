"""benchmarks/gpu_run.sh, the command a session lent a GPU runs: --smoke runs every step at tiny sizes on the
CPU, so that the GPU run does not fail on a typo; a failing step is reported and the others still run."""
import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import gpu_run  # noqa: E402

STEPS = ['env', 'tests', 'simulate', 'simulate_finetune', 'bench', 'checkpoints', 'sample', 'finetune', 'compile 8 batch 2']


def test_smoke_runs_every_step_and_writes_the_figures(tmp_path):
    out = tmp_path / 'out'
    r = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_run.sh'), str(out), '--smoke', '--work', str(tmp_path / 'work')],
                       env={**os.environ, 'PYTHON': sys.executable}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(out)) == ['gpu_run.json', 'gpu_run.log', 'summary.txt'], 'a lent machine sends back 8 files at most'
    report = json.loads((out / 'gpu_run.json').read_text())
    assert sorted(s['step'] for s in report['steps']) == sorted(STEPS) and {s['status'] for s in report['steps']} == {'ok'}
    assert report['env']['torch'] and report['sample']['images'] == 4 and report['sample']['done'].startswith('done: 4 images')
    assert [(r['mode'], r['batch']) for r in report['bench']['results']] == [('original', 1), ('8', 1)]
    assert [(r['mode'], r['batch']) for r in report['simulated']['results']] == [('original', 1), ('8', 1)]
    assert len(report['simulated_finetune']['finetune']) == 4 and report['compile'][0]['mode'] == '8'
    assert [(f['role'], f['grad_ckpt']) for f in report['finetune']] == [(role, c) for role in ('drafter', 'refiner') for c in (False, True)]
    assert all(f['images_per_s'] > 0 for f in report['finetune'])
    assert report['side_by_side'] == [], 'no GPU: no measured peak to put beside the simulated'
    assert (out / 'summary.txt').read_text().startswith('gpu_run smoke in ') and '9 of 9 steps ok' in (out / 'summary.txt').read_text()


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    ran = []
    for name in ('env', 'simulate', 'tests', 'bench', 'sample', 'finetune', 'compile'):
        def step(run, sizes, name=name):
            ran.append(name)
            if name == 'bench':
                raise RuntimeError('CUDA out of memory')
            run.record(name, 'ok', 0)
        monkeypatch.setattr(gpu_run, f'step_{name}', step)
    monkeypatch.setattr(sys, 'argv', ['gpu_run.py', str(tmp_path), '--smoke'])
    assert gpu_run.main() == 1
    assert sorted(ran) == sorted(['env', 'simulate', 'tests', 'bench', 'sample', 'finetune', 'compile'])
    report = json.loads((tmp_path / 'gpu_run.json').read_text())
    assert [s['status'] for s in report['steps'] if s['step'] == 'bench'] == ['error: RuntimeError']
    assert 'CUDA out of memory' in (tmp_path / 'gpu_run.log').read_text() and '6 of 7 steps ok' in capsys.readouterr().out
