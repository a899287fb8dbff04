"""sample_CoDe.py: the reference's FID procedure reproduced, exact class counts and order, the
batch seeding scheme, resuming after SIGKILL, torchrun, and one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sample_CoDe
from conftest import ROOT, user_error
from models import code_schedule, generate
from utils.io import to_uint8


# The same thread count in every process: CPU float rounding (here, of the decode) moves with it.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def local(checkpoints):
    return ['--drafter_ckpt', checkpoints['drafter'], '--refiner_ckpt', checkpoints['refiner'], '--vae_ckpt', checkpoints['vae']]


def sample(checkpoints, out, *args, check=True):
    r = subprocess.run([sys.executable, str(ROOT / 'sample_CoDe.py'), *local(checkpoints), '--output_path', str(out), *args],
                       capture_output=True, text=True, cwd=ROOT, env=ENV)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_reproduces_the_reference_sample_procedure(checkpoints, golden, tmp_path):
    """--batch_size 1 --seed 0: image j of class c sampled alone with seed j, as the reference."""
    _, expected = golden
    sample(checkpoints, tmp_path / 'ref', '--classes', '0-1', '--images_per_class', '2', '--batch_size', '1', '--seed', '0')
    saved = np.load(tmp_path / 'ref.npz')
    assert saved['labels'].tolist() == expected['sample_labels'].tolist() == [0, 0, 1, 1]
    assert saved['arr_0'].dtype == np.uint8 and saved['arr_0'].shape == (4, 256, 256, 3)
    assert np.abs(saved['arr_0'].astype(int) - expected['sample_arr_0'].astype(int)).max() <= 1


@pytest.fixture(scope='module')
def batched(checkpoints, tmp_path_factory):
    """Classes 3, 7, 5, three images each, batches of two: the result every variant must equal."""
    out = tmp_path_factory.mktemp('batched') / 'run'
    r = sample(checkpoints, out, '--classes', '3,7,5', '--images_per_class', '3', '--batch_size', '2', '--seed', '10')
    return out, np.load(f'{out}.npz'), r.stdout


def test_counts_order_and_the_seeding_scheme(batched, models):
    out, saved, stdout = batched
    assert saved['labels'].tolist() == [3, 3, 3, 7, 7, 7, 5, 5, 5]
    assert saved['arr_0'].shape == (9, 256, 256, 3)
    assert 'done: 9 images (9 sampled now)' in stdout and str(out) + '.npz' in stdout
    # image 1 of class 7 was the second row of the batch (j=1, classes 3 and 7), seeded 10 + 1
    vae, drafter, refiner = models
    with torch.inference_mode():
        _, f_hat = generate(code_schedule(drafter, refiner, 8), vae, torch.tensor([3, 7]), seed=11, cfg=1.5,
                            top_k=600, top_p=0.96, temp=[1.1] * 7 + [1.0] * 3)
        image = to_uint8(vae.decode(f_hat))[1]
    assert np.abs(saved['arr_0'][4].astype(int) - image.astype(int)).max() <= 1
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['batch_size'] == 2 and manifest['classes'] == [3, 7, 5]


def test_a_killed_run_resumes_without_redoing_or_losing_work(checkpoints, batched, tmp_path):
    out = tmp_path / 'killed'
    cmd = [sys.executable, str(ROOT / 'sample_CoDe.py'), *local(checkpoints), '--output_path', str(out),
           '--classes', '3,7,5', '--images_per_class', '3', '--batch_size', '2', '--seed', '10']
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    batches = out / 'batches'
    deadline = time.time() + 120
    while time.time() < deadline and len(list(batches.glob('*.npy')) if batches.exists() else []) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in batches.glob('*.npy')}
    assert 2 <= len(finished) < 6, 'the run must be killed part-way'
    assert not (tmp_path / 'killed.npz').exists()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr
    assert f'{sum(1 if n.endswith("_00005.npy") else 2 for n in finished)} already done' in r.stdout
    assert {n: (batches / n).stat().st_mtime_ns for n in finished} == finished, 'finished batches are not redone'
    assert np.array_equal(np.load(tmp_path / 'killed.npz')['arr_0'], batched[1]['arr_0'])


def test_two_processes_under_torchrun_give_the_same_npz(checkpoints, batched, tmp_path):
    out = tmp_path / 'ddp'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(ROOT / 'sample_CoDe.py'), *local(checkpoints), '--output_path', str(out), '--device', 'cpu',
                        '--classes', '3,7,5', '--images_per_class', '3', '--batch_size', '2', '--seed', '10'],
                       capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('done: 9 images') == 1, 'only rank 0 reports'
    saved = np.load(f'{out}.npz')
    assert np.array_equal(saved['arr_0'], batched[1]['arr_0'])
    assert np.array_equal(saved['labels'], batched[1]['labels'])


def test_rerun_with_other_settings_is_refused(checkpoints, batched):
    out = batched[0]
    r = sample(checkpoints, out, '--classes', '3,7,5', '--images_per_class', '3', '--batch_size', '2', '--seed', '10',
               '--cfg', '2.0', check=False)
    assert r.returncode == 2
    assert 'other settings (cfg;' in r.stderr and r.stderr.count('\n') == 1



BAD = [
    (['--classes', '998-1000'], 'class 1000 is outside'),
    (['--classes', 'x'], '--classes takes a range'),
    (['--images_per_class', '0'], 'must be >= 1'),
    (['--batch_size', '0'], 'must be >= 1'),
    (['--draft_steps', '11'], '--draft_steps must be in 1-10'),
    (['--output_path', '/no/such/parent/run'], 'cannot write in /no/such/parent'),
]


@pytest.mark.parametrize('args,message', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_input(args, message, checkpoints, capsys, tmp_path):
    assert message in user_error(sample_CoDe, local(checkpoints) + ['--output_path', str(tmp_path / 'run')] + args, capsys)


def test_too_little_disk_is_refused_before_sampling(checkpoints, capsys, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    err = user_error(sample_CoDe, local(checkpoints) + ['--output_path', str(tmp_path / 'run'), '--classes', '0-9'], capsys)
    assert 'GB free' in err and '500 images' in err
    assert not (tmp_path / 'run' / 'batches').exists()
