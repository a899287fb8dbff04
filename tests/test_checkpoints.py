"""Checkpoints: the official layout key for key, architecture read from files, safe loading,
hub downloads through the Hugging Face cache, and one-line errors for bad files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tiny
from conftest import FIXTURES, ROOT
from models import VAR, VQVAE
from utils import checkpoints
from utils.checkpoints import layout, load_vae, load_var
from utils.errors import UserError

LAYOUT = json.loads((FIXTURES / 'checkpoint_layout.json').read_text())


@pytest.mark.parametrize('depth', [16, 20, 24, 30])
def test_real_size_var_has_the_official_layout(depth):
    with torch.device('meta'):
        model = VAR(depth=depth, embed_dim=64 * depth, num_heads=depth)
    official = {k: tuple(v) for k, v in LAYOUT[f'var_d{depth}'].items()}
    assert layout(model) == official
    assert set(model.derived_buffer_shapes()) == set(LAYOUT[f'var_d{depth}_buffers'])
    assert not set(model.state_dict()) & set(LAYOUT[f'var_d{depth}_buffers']), 'buffers are derived, not loaded'


def test_real_size_vae_has_the_official_layout():
    with torch.device('meta'):
        model = VQVAE(vocab_size=4096, Cvae=32, ch=160)
    assert layout(model) == {k: tuple(v) for k, v in LAYOUT['vae_ch160v4096z32'].items()}
    assert set(model.derived_buffer_shapes()) == set(LAYOUT['vae_buffers'])


def test_architecture_is_read_from_the_file(checkpoints):
    drafter = load_var(checkpoints['drafter'], 'cpu')
    refiner = load_var(checkpoints['refiner'], 'cpu')
    vae = load_vae(checkpoints['vae'], 'cpu')
    assert (drafter.depth, drafter.C, drafter.num_heads) == (2, 128, 2)
    assert (refiner.depth, refiner.C, refiner.num_heads) == (1, 64, 1)
    assert (vae.vocab_size, vae.Cvae, vae.config['ch'], vae.config['ch_mult']) == (4096, 32, 32, (1, 1, 2, 2, 4))
    for loaded, built in ((drafter, tiny.tiny_drafter()), (vae, tiny.tiny_vae())):
        for (k, a), (_, b) in zip(loaded.state_dict().items(), built.state_dict().items()):
            assert torch.equal(a, b), k


def test_a_state_dict_saved_by_this_code_loads_too(tmp_path):
    path = tmp_path / 'ours.pth'
    torch.save(tiny.tiny_refiner().state_dict(), path)  # no derived buffers in it
    assert load_var(str(path), 'cpu').depth == 1


def test_depth_flag_disagreeing_with_the_file_names_both(checkpoints):
    with pytest.raises(UserError, match=r'--drafter_depth 30 disagrees with .*tiny_drafter.pth, which holds a depth-2 VAR'):
        load_var(checkpoints['drafter'], 'cpu', '--drafter_depth', 30)


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'missing'])
def test_broken_file_is_a_one_line_error_naming_it(checkpoints, tmp_path, damage):
    path = tmp_path / f'{damage}.pth'
    if damage == 'truncated':
        data = open(checkpoints['refiner'], 'rb').read()
        path.write_bytes(data[:len(data) // 2])
    elif damage == 'garbage':
        path.write_bytes(b'this is not a checkpoint\n' * 10)
    with pytest.raises(UserError) as e:
        load_var(str(path), 'cpu')
    assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_file_of_the_wrong_kind(checkpoints):
    with pytest.raises(UserError, match='is a VAR checkpoint, expected a VQVAE one'):
        load_vae(checkpoints['drafter'], 'cpu')
    with pytest.raises(UserError, match='is a VQVAE checkpoint, expected a VAR one'):
        load_var(checkpoints['vae'], 'cpu')


def test_pickled_code_is_never_run(tmp_path):
    """weights_only=True: a checkpoint that would execute code on unpickling is refused."""
    path, marker = tmp_path / 'evil.pth', tmp_path / 'ran'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    torch.save({'x': Evil()}, path)
    with pytest.raises(UserError, match='cannot read'):
        load_var(str(path), 'cpu')
    assert not marker.exists()


def test_shape_mismatch_is_reported(checkpoints, tmp_path):
    sd = torch.load(checkpoints['refiner'], weights_only=True)
    sd['head.bias'] = torch.zeros(7)
    path = tmp_path / 'bad_shape.pth'
    torch.save(sd, path)
    with pytest.raises(UserError, match=r'wrong shape: head.bias'):
        load_var(str(path), 'cpu')


def fill_hf_cache(cache, repo, filename, source):
    """Lay a file out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<file>."""
    folder = cache / f'models--{repo.replace("/", "--")}'
    commit = '0123456789abcdef0123456789abcdef01234567'
    (folder / 'refs').mkdir(parents=True, exist_ok=True)
    (folder / 'refs' / 'main').write_text(commit)
    (folder / 'snapshots' / commit).mkdir(parents=True, exist_ok=True)
    (folder / 'snapshots' / commit / filename).write_bytes(open(source, 'rb').read())


def run_script(script, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_hub_files_come_from_the_cache_offline(checkpoints, tmp_path):
    cache = tmp_path / 'hub'
    fill_hf_cache(cache, 'FoundationVision/var', 'vae_ch160v4096z32.pth', checkpoints['vae'])
    out = tmp_path / 'o.png'
    r = run_script('infer_original.py', '--var_ckpt', checkpoints['refiner'], '--class_labels', '1', '--repeats', '1',
                   '--output', str(out), env={'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(cache)})
    assert r.returncode == 0, r.stderr
    assert out.exists()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty'))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'empty'))
    with pytest.raises(UserError) as e:
        checkpoints.vae_path(None)
    message = str(e.value)
    assert 'vae_ch160v4096z32.pth' in message and 'FoundationVision/var' in message and '--vae_ckpt' in message
    assert '\n' not in message


def test_unavailable_code_weights_are_refused_before_any_download(monkeypatch):
    def no_download(*a):
        raise AssertionError('nothing may be downloaded')
    monkeypatch.setattr(checkpoints, 'download', no_download)
    for drafter, refiner, steps in ((24, 16, 8), (30, 20, 8), (30, 16, 5)):
        with pytest.raises(UserError, match='fine-tuned CoDe weights exist only'):
            checkpoints.code_paths(None, None, drafter, refiner, steps, training_free=False)
    with pytest.raises(UserError, match='no official VAR of depth 12'):
        checkpoints.code_paths(None, None, 30, 12, 8, training_free=True)


def test_which_hub_files_each_mode_uses(monkeypatch):
    fetched = []
    monkeypatch.setattr(checkpoints, 'download', lambda repo, name, flag: fetched.append(f'{repo}/{name}') or name)
    checkpoints.code_paths(None, None, None, None, 7, training_free=False)
    checkpoints.code_paths(None, None, 24, 20, 3, training_free=True)
    checkpoints.code_paths('mine.pth', 'other.pth', 12, 6, 2, training_free=False)  # local files: any pair
    assert fetched == ['Zigeng/VAR_CoDe/drafter_7.pth', 'Zigeng/VAR_CoDe/refiner_7.pth',
                       'FoundationVision/var/var_d24.pth', 'FoundationVision/var/var_d20.pth']


def test_weight_digests_are_kept_per_file_and_redone_when_the_file_changes(checkpoints, tmp_path, monkeypatch):
    """sample_CoDe.py keys a run on its weights' content; an 8 GB file is hashed once, not at every
    resume, and a copy elsewhere has the same digest."""
    import os
    import shutil
    from utils import checkpoints as ck
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    hashed = []
    real = ck.tensor_digest
    monkeypatch.setattr(ck, 'tensor_digest', lambda model: (hashed.append(model.source_file), real(model))[1])
    copy = tmp_path / 'moved.pth'
    shutil.copy(checkpoints['refiner'], copy)
    first = ck.weights_digest(ck.load_var(checkpoints['refiner'], 'cpu'))
    assert ck.weights_digest(ck.load_var(checkpoints['refiner'], 'cpu')) == first and len(hashed) == 1
    assert ck.weights_digest(ck.load_var(str(copy), 'cpu')) == first and len(hashed) == 2
    os.utime(copy, ns=(1, 1))  # touched: hashed again, same content, same digest
    assert ck.weights_digest(ck.load_var(str(copy), 'cpu')) == first and len(hashed) == 3
    assert ck.weights_digest(ck.load_var(checkpoints['drafter'], 'cpu')) != first


def test_files_written_here_carry_the_official_derived_buffers():
    """weights.pth (and the test checkpoints) hold the buffers the official VAR registers: the scale of
    each of the 680 positions (1 of scale 0, 4 of scale 1, ... 256 of scale 9), the block-causal mask
    (0 where a position may attend, -inf elsewhere) and the keys' zero bias."""
    model = tiny.tiny_refiner()
    sd = tiny.official_state_dict(model)
    level = np.repeat(np.arange(10), [pn * pn for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)])
    assert sd['lvl_1L'].shape == (1, 680) and sd['lvl_1L'][0].tolist() == level.tolist()
    mask = sd['attn_bias_for_masking'][0, 0].numpy()
    assert mask.shape == (680, 680)
    assert (mask[4, :5] == 0).all() and np.isneginf(mask[4, 5:]).all()   # position 4 is scale 1: sees scales 0-1
    assert (mask[679] == 0).all() and np.isneginf(mask[0, 1:]).all()
    assert torch.equal(sd['blocks.0.attn.zero_k_bias'], torch.zeros(64))


def small_vae():  # every kind of tensor the VQVAE has (encoder, decoder, quantiser), two levels: hashed 300 times quickly
    return tiny.apply_rule(VQVAE(vocab_size=4096, Cvae=32, ch=32, ch_mult=(1, 2)), tiny.VAE_SALT)


@pytest.mark.parametrize('build', [tiny.tiny_drafter, tiny.tiny_refiner, small_vae], ids=['drafter', 'refiner', 'vae'])
def test_one_changed_element_of_any_tensor_changes_the_digest(build):
    """A resumed sample run trusts its batches only while the digest holds: every element of every tensor
    of every model must count (its first, its last, the last tensor's too), not the names or shapes alone."""
    from utils.checkpoints import tensor_digest
    model = build()
    original = tensor_digest(model)
    digests = {original}
    for name, t in model.state_dict().items():
        for index in {0, t.numel() - 1}:
            flat = t.view(-1)
            old = flat[index].clone()
            flat[index] = old + 1 if t.is_floating_point() else old ^ 1
            digests.add(tensor_digest(model))
            flat[index] = old
    assert len(digests) == 1 + sum(min(2, t.numel()) for t in model.state_dict().values()), 'every change gave a new digest'
    assert tensor_digest(model) == original
