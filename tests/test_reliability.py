"""What a new user meets: models that do not fit together refused in every script, whichever flags
name them; bad input that used to end in a traceback or a misleading line; the files a killed run
left behind removed by the rerun."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import evaluate
import infer_CoDe
import infer_original
import inpaint_CoDe
import sample_CoDe
import tiny
from conftest import run_main, user_error
from models import VAR, VQVAE


@pytest.fixture(scope='module')
def odd(tmp_path_factory):
    """Checkpoints that load on their own but do not fit the tiny drafter and VQVAE."""
    folder = tmp_path_factory.mktemp('odd')
    variants = dict(vocab1024=dict(vocab_size=1024), classes10=dict(num_classes=10), cvae16=dict(Cvae=16))
    paths = {}
    for name, change in variants.items():
        paths[name] = str(folder / f'{name}.pth')
        torch.save(tiny.official_state_dict(tiny.apply_rule(VAR(depth=1, embed_dim=64, num_heads=1, **change), 5)), paths[name])
    paths['vae1024'] = str(folder / 'vae1024.pth')
    torch.save(tiny.official_state_dict(tiny.apply_rule(VQVAE(vocab_size=1024, Cvae=32, ch=32), 5)), paths['vae1024'])
    image = folder / 'image.png'
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(image)
    paths['image'] = str(image)
    return paths


def code_flags(checkpoints, refiner, vae=None):
    return ['--drafter_ckpt', checkpoints['drafter'], '--refiner_ckpt', refiner, '--vae_ckpt', vae or checkpoints['vae']]


def script_runs(checkpoints, odd, tmp_path, models):
    """The same models through infer_CoDe.py, sample_CoDe.py and inpaint_CoDe.py."""
    return [(infer_CoDe, models + ['--class_labels', '1,2', '--output', str(tmp_path / 'o.png')]),
            (sample_CoDe, models + ['--classes', '1,2', '--images_per_class', '1', '--output_path', str(tmp_path / 'run')]),
            (inpaint_CoDe, models + ['--image', odd['image'], '--class_labels', '1', '--box', '0,0,64,64',
                                     '--output', str(tmp_path / 'i.png')])]


@pytest.mark.parametrize('refiner,message', [
    ('vocab1024', 'the refiner (vocab1024.pth) has vocab_size (tokens) 1024, the drafter (tiny_drafter.pth) has 4096'),
    ('classes10', 'the refiner (classes10.pth) has num_classes 10, the drafter (tiny_drafter.pth) has 1000'),
    ('cvae16', 'the refiner (cvae16.pth) has Cvae (latent width) 16'),
])
def test_a_refiner_that_does_not_fit_the_drafter_is_refused_in_every_script(refiner, message, checkpoints, odd, tmp_path, capsys):
    for script, args in script_runs(checkpoints, odd, tmp_path, code_flags(checkpoints, odd[refiner])):
        assert message in user_error(script, args, capsys), script.__name__
    assert not (tmp_path / 'o.png').exists() and not (tmp_path / 'run' / 'batches').exists() and not (tmp_path / 'i.png').exists()


def test_a_var_that_does_not_fit_the_vqvae_is_refused(checkpoints, odd, tmp_path, capsys):
    """A 1024-token VAR with the 4096-token VQVAE used to sample and exit 0 (with --top_k 2000, a traceback)."""
    for top_k in ([], ['--top_k', '2000']):
        err = user_error(infer_original, ['--var_ckpt', odd['vocab1024'], '--vae_ckpt', checkpoints['vae'], '--class_labels', '1',
                                          '--output', str(tmp_path / 'o.png'), *top_k], capsys)
        assert 'the VAR (vocab1024.pth) has vocab_size (tokens) 1024, the VQVAE (tiny_vae.pth) has 4096' in err
    for script, args in script_runs(checkpoints, odd, tmp_path, code_flags(checkpoints, checkpoints['refiner'], odd['vae1024'])):
        assert 'the VQVAE (vae1024.pth) has 1024' in user_error(script, args, capsys), script.__name__


def test_every_model_of_a_cascade_is_checked_the_middle_one_too(checkpoints, odd, tmp_path, capsys):
    a, b = checkpoints['drafter'], checkpoints['refiner']
    schedule = ['--schedule', f'{a}:6,{odd["classes10"]}:8,{b}', '--vae_ckpt', checkpoints['vae']]
    err = user_error(infer_CoDe, schedule + ['--class_labels', '500', '--output', str(tmp_path / 'o.png')], capsys)
    assert 'stage 2 (classes10.pth) has num_classes 10, stage 1 (tiny_drafter.pth) has 1000' in err


@pytest.mark.parametrize('flag', ['--drafter_ckpt', '--refiner_ckpt'])
def test_a_schedule_with_a_two_model_flag_is_refused(flag, checkpoints, tmp_path, capsys):
    a, b = checkpoints['drafter'], checkpoints['refiner']
    args = ['--schedule', f'{a}:6,{b}', flag, a, '--vae_ckpt', checkpoints['vae'], '--output', str(tmp_path / 'o.png')]
    assert f'--schedule replaces {flag}' in user_error(infer_CoDe, args, capsys)


def test_class_names_are_matched_whatever_their_case(checkpoints, tmp_path):
    """torchvision's names carry capitals ('Labrador retriever', 'German shepherd'); a user types any case."""
    from utils.cli import class_index
    assert class_index('labrador RETRIEVER') == 208 and class_index('german shepherd') == 235
    assert class_index('  Tabby ') == 281
    assert class_index('IPOD') == 605, "the name itself, although 'tripod' contains it too"
    assert class_index('golden') == 207, 'a name that only one class contains is that class'


def test_the_benchmark_refuses_what_it_cannot_build(capsys):
    cases = [(['--drafter_depth', '0'], '--drafter_depth must be >= 1'),
             (['--drafter_depth', '-2'], '--drafter_depth must be >= 1'),
             (['--refiner_depth', '0'], '--refiner_depth must be >= 1'),
             (['--vae_ch', '0'], '--vae_ch must be a positive multiple of 32'),
             (['--vae_ch', '7'], '--vae_ch must be a positive multiple of 32'),
             (['--drafter_ckpt', 'mine.pth'], '--random_weights builds every model with random weights; drop --drafter_ckpt'),
             (['--schedule', 'd2:6,d0'], 'a depth must be >= 1'),
             (['--schedule', 'mine.pth:6,d2'], 'every model is a depth dNN, not a file')]
    for args, message in cases:
        assert message in user_error(benchmark, ['--random_weights', '--device', 'cpu', *args], capsys), args


def test_evaluate_checks_where_it_writes_before_reading_an_image(tmp_path, capsys, monkeypatch):
    sample = tmp_path / 'samples.npz'
    np.savez(sample, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / 'samples.metrics.json').mkdir()  # the metrics file cannot be written
    monkeypatch.setattr(evaluate, 'Inception', lambda *a: pytest.fail('no image may be read first'))
    err = user_error(evaluate, [str(sample), str(sample), '--device', 'cpu'], capsys)
    assert f'the metrics file {tmp_path / "samples.metrics.json"} is a folder' in err
    assert f'{tmp_path} is a folder; give an .npz file' in user_error(evaluate, [str(tmp_path), str(sample)], capsys)


def test_a_folder_where_a_file_belongs_is_named_as_such(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / 'folder'
    folder.mkdir()
    code = code_flags(checkpoints, checkpoints['refiner'])
    assert f'{folder} is a folder; give the checkpoint file' in user_error(
        infer_CoDe, ['--drafter_ckpt', str(folder), *code[2:], '--class_labels', '1'], capsys)
    assert f'--output {folder} is a folder; give a file name' in user_error(infer_CoDe, code + ['--output', str(folder)], capsys)
    assert f'{folder} is a folder; give image files' in user_error(
        inpaint_CoDe, code + ['--image', str(folder), '--class_labels', '1', '--box', '0,0,8,8'], capsys)


def test_a_negative_box_corner_is_a_value_not_a_flag(checkpoints, odd, tmp_path, capsys):
    """argparse took '-10,0,20,20' for an option ('expected one argument')."""
    args = code_flags(checkpoints, checkpoints['refiner']) + ['--image', odd['image'], '--class_labels', '1', '--box', '-10,0,20,20']
    assert '--box -10,0,20,20 is empty or leaves the 256x256 frame' in user_error(inpaint_CoDe, args, capsys)


def test_a_small_disk_is_reported_in_megabytes(checkpoints, capsys, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    err = user_error(sample_CoDe, code_flags(checkpoints, checkpoints['refiner']) + [
        '--output_path', str(tmp_path / 'run'), '--classes', '0-9', '--images_per_class', '5'], capsys)
    # 50 images in batch files plus the npz: 100 x 256 x 256 x 3 bytes, 2% margin = 20,054,016 bytes
    assert '1.0 MB free, 20 MB needed' in err


def test_a_rerun_removes_the_half_written_files_a_killed_run_left(checkpoints, tmp_path, capsys):
    """SIGKILL skips the clean-up of a write-then-rename: the rerun removes those files, and only those."""
    out = tmp_path / 'run'
    args = code_flags(checkpoints, checkpoints['refiner']) + ['--output_path', str(out), '--classes', '3', '--images_per_class', '1']
    os.makedirs(out / 'batches')
    dead = 2 ** 30  # above any pid_max: the process that wrote these is gone
    leftovers = [out / 'batches' / f'00000_00003.images.npy.{dead}.tmp', out / 'batches' / f'00000_00003.tokens.npy.{dead + 1}.tmp',
                 out / f'manifest.json.{dead}.tmp', tmp_path / f'run.npz.{dead}.tmp']
    for path in leftovers:
        path.write_bytes(b'x' * 1000)
    others = [out / 'batches' / 'notes.txt', tmp_path / f'other.npz.{dead}.tmp', out / 'batches' / 'mine.tmp',
              out / 'batches' / f'00000_00005.images.npy.{os.getpid()}.tmp']  # a live process's write is left alone
    for path in others:
        path.write_bytes(b'keep')
    capsys.readouterr()
    run_main(sample_CoDe, args)
    assert 'removed 4.0 kB of half-written files a killed run left' in capsys.readouterr().out
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in others)
    assert np.load(tmp_path / 'run.npz')['arr_0'].shape == (1, 256, 256, 3)
