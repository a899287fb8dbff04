"""The two scripts end to end: reference parity through --save_npz, and one-line errors (exit 2)
for bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import infer_CoDe
import infer_original
from conftest import ROOT, run_main, user_error

GOLDEN_LABELS = '992,483,970,609'


def run_cli(script, args, tmp_path):
    out = tmp_path / 'out.png'
    npz = tmp_path / 'out.npz'
    r = subprocess.run([sys.executable, str(ROOT / script), *args, '--output', str(out), '--save_npz', str(npz), '--repeats', '1'],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    return np.load(npz), r.stdout


def test_infer_original_reproduces_the_reference(checkpoints, golden, tmp_path):
    """Golden case 0 is the reference infer_original.py's settings on four of its labels."""
    saved, stdout = run_cli('infer_original.py', ['--var_ckpt', checkpoints['drafter'], '--vae_ckpt', checkpoints['vae'],
                                                  '--class_labels', GOLDEN_LABELS], tmp_path)
    expected = golden[1]
    assert np.array_equal(saved['tokens'], expected['case0_tokens'])
    assert saved['labels'].tolist() == [992, 483, 970, 609]
    assert saved['images'].shape == (4, 256, 256, 3) and saved['images'].dtype == np.uint8
    assert np.abs(saved['images'].astype(int) - expected['case0_image']).max() <= 1
    assert 'ms for 4 images (VQVAE decode included)' in stdout and 'peak memory' in stdout


def test_infer_code_reproduces_the_reference(checkpoints, golden, tmp_path):
    """Golden case 10 is the reference infer_CoDe.py's defaults (N=8, top_k 600, temp 1.1/1.0)."""
    saved, _ = run_cli('infer_CoDe.py', ['--drafter_ckpt', checkpoints['drafter'], '--refiner_ckpt', checkpoints['refiner'],
                                         '--vae_ckpt', checkpoints['vae'], '--class_labels', GOLDEN_LABELS], tmp_path)
    expected = golden[1]
    assert np.array_equal(saved['tokens'], expected['case10_tokens'])
    assert np.abs(saved['images'].astype(int) - expected['case10_image']).max() <= 1


def test_grid_png_is_eight_per_row(checkpoints, tmp_path):
    from PIL import Image
    out = tmp_path / 'grid.png'
    args = ['--var_ckpt', checkpoints['refiner'], '--vae_ckpt', checkpoints['vae'], '--class_labels', '1,2,3,4,5,6,7,8,9',
            '--repeats', '1', '--output', str(out), '--save_npz', str(tmp_path / 'g.npz')]
    run_main(infer_original, args)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (512, 2048, 3)
    images = np.load(tmp_path / 'g.npz')['images']
    assert np.array_equal(grid[:256, 256:512], images[1]) and np.array_equal(grid[256:, :256], images[8])
    assert (grid[256:, 256:] == 255).all(), 'empty cells are white, as make_grid(pad_value=1) leaves them'


def local(checkpoints, code=True):
    if code:
        return ['--drafter_ckpt', checkpoints['drafter'], '--refiner_ckpt', checkpoints['refiner'], '--vae_ckpt', checkpoints['vae']]
    return ['--var_ckpt', checkpoints['drafter'], '--vae_ckpt', checkpoints['vae']]


BAD_CODE = [
    (['--draft_steps', '0'], '--draft_steps must be in 1-9'),
    (['--draft_steps', '10'], '--draft_steps must be in 1-9'),
    (['--top_k', '600,600,600'], '--top_k takes 1 or 10'),
    (['--temp', '1.0,1.0'], '--temp takes 1 or 10'),
    (['--temp', '0'], '--temp must be > 0'),
    (['--top_p', '1.5'], '--top_p must be in [0, 1]'),
    (['--top_p', '-0.1'], '--top_p must be in [0, 1]'),
    (['--cfg', '-1'], '--cfg must be >= 0'),
    (['--cfg', 'four'], "invalid float value: 'four'"),
    (['--top_k', '-5'], '--top_k must be >= 0'),
    (['--top_k', '5000'], 'exceeds the vocabulary size 4096'),
    (['--class_labels', '5,1000'], 'class 1000 is outside'),
    (['--class_labels', 'a,b'], '--class_labels takes comma-separated ints'),
    (['--repeats', '0'], '--repeats must be >= 1'),
    (['--output', '/no/such/folder/x.png'], 'does not exist'),
    (['--output', 'grid.xyz'], 'unknown image type'),
    (['--device', 'tpu'], '--device'),
]


@pytest.mark.parametrize('args,message', BAD_CODE, ids=[' '.join(a) for a, _ in BAD_CODE])
def test_bad_input_is_one_line_and_exit_2(args, message, checkpoints, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in user_error(infer_CoDe, local(checkpoints) + args, capsys)


BAD_HUB = [
    (infer_CoDe, ['--drafter_depth', '24'], 'fine-tuned CoDe weights exist only'),
    (infer_CoDe, ['--draft_steps', '3'], 'fine-tuned CoDe weights exist only'),
    (infer_CoDe, ['--training_free', '--refiner_depth', '12'], 'no official VAR of depth 12'),
    (infer_CoDe, ['--class_labels', '1000'], 'class 1000 is outside'),
    (infer_original, ['--model_depth', '12'], 'no official VAR of depth 12'),
    (infer_original, ['--var_ckpt', '/no/such.pth', '--vae_ckpt', '/no/vae.pth'], 'checkpoint not found: /no/such.pth'),
    (infer_original, ['--top_k', '1,2'], '--top_k takes one value here'),
]


@pytest.mark.parametrize('script,args,message', BAD_HUB, ids=[' '.join(a) for _, a, _ in BAD_HUB])
def test_bad_input_is_refused_before_any_download(script, args, message, capsys, monkeypatch, tmp_path):
    from utils import checkpoints as ck
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ck, 'download', lambda *a: pytest.fail('nothing may be downloaded'))
    assert message in user_error(script, args, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message given on a machine without a GPU')
def test_cuda_without_a_gpu(checkpoints, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert 'no CUDA GPU is available' in user_error(infer_original, local(checkpoints, code=False) + ['--device', 'cuda'], capsys)


def test_depth_flag_disagreeing_with_a_local_file(checkpoints, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert '--model_depth 16 disagrees with' in user_error(infer_original, local(checkpoints, code=False) + ['--model_depth', '16'], capsys)


def test_a_real_process_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / 'infer_CoDe.py'), '--draft_steps', '12'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == 'infer_CoDe.py: error: --draft_steps must be in 1-9, got 12'
