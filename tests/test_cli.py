"""The two scripts end to end: reference parity through --save_npz, and one-line errors (exit 2)
for bad input."""
import argparse
import copy
import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import infer_CoDe
import infer_original
from conftest import ROOT, run_main, user_error
from models import VQVAE, code_schedule, generate
from utils import cli

GOLDEN_LABELS = '992,483,970,609'


def run_cli(script, args, tmp_path, capsys):
    """The script's main() on this command line, in this process (a real process is
    test_a_real_process_prints_no_traceback's); returns the npz it saved and what it printed."""
    out = tmp_path / 'out.png'
    npz = tmp_path / 'out.npz'
    capsys.readouterr()
    run_main(script, [*args, '--output', str(out), '--save_npz', str(npz), '--repeats', '1'])
    assert out.exists()
    return np.load(npz), capsys.readouterr().out


def test_infer_original_reproduces_the_reference(checkpoints, golden, tmp_path, capsys):
    """Golden case 0 is the reference infer_original.py's settings on four of its labels."""
    saved, stdout = run_cli(infer_original, ['--var_ckpt', checkpoints['drafter'], '--vae_ckpt', checkpoints['vae'],
                                                  '--class_labels', GOLDEN_LABELS], tmp_path, capsys)
    expected = golden[1]
    assert np.array_equal(saved['tokens'], expected['case0_tokens'])
    assert saved['labels'].tolist() == [992, 483, 970, 609]
    assert saved['images'].shape == (4, 256, 256, 3) and saved['images'].dtype == np.uint8
    assert np.abs(saved['images'].astype(int) - expected['case0_image']).max() <= 1
    assert 'ms for 4 images (VQVAE decode included)' in stdout and 'peak memory' in stdout


def test_infer_code_reproduces_the_reference(checkpoints, golden, tmp_path, capsys):
    """Golden case 10 is the reference infer_CoDe.py's defaults (N=8, top_k 600, temp 1.1/1.0)."""
    saved, _ = run_cli(infer_CoDe, ['--drafter_ckpt', checkpoints['drafter'], '--refiner_ckpt', checkpoints['refiner'],
                                         '--vae_ckpt', checkpoints['vae'], '--class_labels', GOLDEN_LABELS], tmp_path, capsys)
    expected = golden[1]
    assert np.array_equal(saved['tokens'], expected['case10_tokens'])
    assert np.abs(saved['images'].astype(int) - expected['case10_image']).max() <= 1


def test_grid_png_is_eight_per_row(checkpoints, tmp_path, cheap_decode):
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
    (['--class_labels', '1,golden retrievr'], "unknown ImageNet class name 'golden retrievr'; closest: golden retriever"),
    (['--class_labels', 'Retriever'], "class name 'Retriever' is ambiguous: 5 names contain it (flat-coated retriever"),
    (['--repeats', '0'], '--repeats must be >= 1'),
    (['--output', '/no/such/folder/x.png'], 'does not exist'),
    (['--output', 'grid.xyz'], 'unknown image type'),
    (['--device', 'tpu'], '--device'),
    (['--class_labels', '1,,2'], "empty entry in '1,,2'"),
    (['--top_k', '600,'], 'empty entry'),
    (['--dtype', 'fp16', '--device', 'cpu'], '--dtype fp16 is for GPUs'),
    (['--save_npz', '.'], 'is a folder'),
    (['--output', '/proc/x.png'], 'cannot write in /proc'),
    (['--save_npz', '/proc/x.npz'], 'cannot write in /proc'),
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


SCRIPTS = ['infer_CoDe', 'infer_original', 'sample_CoDe', 'inpaint_CoDe', 'benchmark', 'evaluate', 'finetune_CoDe']


@pytest.mark.parametrize('name', SCRIPTS)
def test_every_flag_has_help_that_states_its_default(name):
    parser = importlib.import_module(name).parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f'{name} {action.option_strings} has no help'
        if action.default not in (None, False, []) and not action.required:
            assert 'default' in action.help.lower(), f'{name} {action.option_strings}: default {action.default!r} not shown'


def test_inpaint_without_class_labels_names_the_flag(capsys):
    import inpaint_CoDe
    assert '--class_labels' in user_error(inpaint_CoDe, ['--image', 'x.png', '--box', '0,0,8,8'], capsys)


def test_offline_hub_fails_at_once_with_one_line(tmp_path):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')}
    r = subprocess.run([sys.executable, str(ROOT / 'infer_original.py')], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.count('\n') == 1 and 'var_d30.pth (Hugging Face repo FoundationVision/var) is not in the cache and HF_HUB_OFFLINE is set' in r.stderr


def test_a_download_says_what_it_fetches_before_it_starts(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as hf_constants
    import infer_original
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(huggingface_hub, 'try_to_load_from_cache', lambda *a, **k: None)  # nothing cached

    def no_network(**kw):
        assert 'downloading var_d24.pth (about 4.1 GB) from the Hugging Face repo FoundationVision/var' in capsys.readouterr().out
        raise OSError('network unreachable')

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
    err = user_error(infer_original, ['--model_depth', '24', '--output', str(tmp_path / 'o.png')], capsys)
    assert 'could not get var_d24.pth' in err and 'network unreachable' in err and '--var_ckpt' in err


# ----------------------------------------------------------------------------- precision, autocast, TF32, --compile

@pytest.fixture
def fake_gpu(monkeypatch):
    """runtime() as it behaves on a machine with one GPU (nothing runs on it). The TF32 flags are
    saved and restored by hand: torch serves them through a module __getattr__, which monkeypatch
    (pytest >= 9.2) takes for a missing attribute and then fails to undo."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def runtime_of(**flags):
    return cli.runtime(SimpleNamespace(**{'device': 'cuda', 'dtype': None, 'compile': False, **flags}))


def test_gpu_defaults_to_fp16_with_tf32_and_fp32_turns_tf32_off(fake_gpu):
    """The reference samples in fp16 autocast; fp32 must be exact fp32 (no TF32 matmuls)."""
    assert runtime_of()[1] == torch.float16
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert runtime_of(dtype='bf16')[1] == torch.bfloat16
    assert runtime_of(dtype='fp32')[1] == torch.float32
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    args = SimpleNamespace(device='cuda', dtype=None, compile=True)
    cli.runtime(args)
    assert args.compile, '--compile stays on on a GPU'
    args = SimpleNamespace(device='cpu', dtype=None, compile=True)
    assert cli.runtime(args)[1] == torch.float32 and not args.compile


def test_infer_samples_under_autocast_in_the_dtype_asked(checkpoints, tmp_path, monkeypatch):
    """--dtype bf16 (on the CPU here): the KV caches are allocated in bf16 because sampling runs
    under bf16 autocast."""
    from models import var as var_module
    dtypes = []
    original = var_module.KVCache.__init__
    monkeypatch.setattr(var_module.KVCache, '__init__', lambda self, *a: (original(self, *a), dtypes.append(self.k.dtype))[0])
    monkeypatch.setattr(VQVAE, 'decode', lambda self, f_hat: torch.zeros(len(f_hat), 3, 256, 256))  # bf16 convolutions crawl on a CPU
    run_main(infer_CoDe, local(checkpoints) + ['--device', 'cpu', '--dtype', 'bf16', '--class_labels', '1,2', '--repeats', '1',
                                              '--output', str(tmp_path / 'o.png')])
    assert dtypes == [torch.bfloat16, torch.bfloat16]


def test_compile_captures_every_scale_step_and_samples_the_eager_tokens(models, monkeypatch):
    """--compile wraps each model's step in torch.compile (reduce-overhead, one full graph per scale);
    traced here with the eager backend (CUDA graphs need a GPU), so a graph break fails the test."""
    from utils.infer import prepare
    vae, _, refiner = models
    real, seen, steps = torch.compile, [], []

    def compile_eagerly(fn, **kw):
        seen.append(kw)
        compiled = real(fn, backend='eager', fullgraph=kw['fullgraph'], dynamic=kw['dynamic'])
        return lambda *a: (steps.append(a[0]), compiled(*a))[1]

    monkeypatch.setattr(torch, 'compile', compile_eagerly)
    model = copy.deepcopy(refiner)  # the session's models stay uncompiled
    schedule = code_schedule(model, model, 8)  # prefill steps too
    prepare(SimpleNamespace(compile=True, top_k=[600] * 10), schedule, vae, [1, 2], torch.float32)
    assert seen == [dict(mode='reduce-overhead', fullgraph=True, dynamic=False)]
    kw = dict(seed=0, cfg=1.5, top_k=600, top_p=0.96)
    compiled, _ = generate(schedule, vae, torch.tensor([1, 2]), **kw)
    assert steps == list(range(8)) + list(range(10)), 'every scale, prefill included, runs through the compiled step'
    eager, _ = generate(code_schedule(refiner, refiner, 8), vae, torch.tensor([1, 2]), **kw)
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_on_a_gpu_fp16_is_the_default_and_fp32_is_exact_fp32(checkpoints, tmp_path, monkeypatch):
    from models import var as var_module
    dtypes = []
    original = var_module.KVCache.__init__
    monkeypatch.setattr(var_module.KVCache, '__init__', lambda self, *a: (original(self, *a), dtypes.append(self.k.dtype))[0])
    args = local(checkpoints) + ['--class_labels', '1,2', '--repeats', '1', '--output', str(tmp_path / 'o.png')]
    run_main(infer_CoDe, args)
    assert set(dtypes) == {torch.float16}
    run_main(infer_CoDe, args + ['--dtype', 'fp32'])
    assert dtypes[-1] == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_on_a_gpu_compile_samples_the_eager_tokens_and_peak_memory_is_reported(checkpoints, tmp_path, capsys):
    outs = []
    for extra in ([], ['--compile']):
        npz = tmp_path / f'{len(extra)}.npz'
        run_main(infer_CoDe, local(checkpoints) + ['--class_labels', '1,2,3', '--repeats', '2', '--dtype', 'fp32',
                                                  '--output', str(tmp_path / 'o.png'), '--save_npz', str(npz), *extra])
        outs.append(np.load(npz)['tokens'])
        assert 'MiB (torch.cuda.max_memory_allocated)' in capsys.readouterr().out
    assert np.array_equal(*outs)


def test_class_names_select_the_same_classes_as_numbers(checkpoints, tmp_path, capsys, cheap_decode):
    saved = []
    for labels in ('Golden Retriever,tabby,207', '207,281,207'):
        npz = tmp_path / 'names.npz'
        run_main(infer_original, local(checkpoints, code=False) + ['--class_labels', labels, '--repeats', '1',
                                                                   '--output', str(tmp_path / 'o.png'), '--save_npz', str(npz)])
        saved.append(dict(np.load(npz)))
    assert np.array_equal(saved[0]['tokens'], saved[1]['tokens'])
    assert saved[0]['labels'].tolist() == [207, 281, 207]
    assert saved[0]['class_names'].tolist() == ['golden retriever', 'tabby', 'golden retriever']
    assert 'classes: 207 golden retriever, 281 tabby, 207 golden retriever' in capsys.readouterr().out


# ----------------------------------------------------------------------------- --schedule

def tokens_of(script, args, tmp_path, name):
    npz = tmp_path / f'{name}.npz'
    run_main(script, args + ['--class_labels', '3,141', '--repeats', '1', '--output', str(tmp_path / 'o.png'), '--save_npz', str(npz)])
    return np.load(npz)['tokens']


def test_schedules_split_like_the_two_model_flags(checkpoints, tmp_path, cheap_decode):
    """A:8,B is --drafter A --refiner B --draft_steps 8; splitting B's stage in two (B prefills its own
    scales with the same weights) changes nothing; a three-model cascade differs from both."""
    a, b, m, vae = checkpoints['drafter'], checkpoints['refiner'], checkpoints['middle'], ['--vae_ckpt', checkpoints['vae']]
    pair = tokens_of(infer_CoDe, local(checkpoints) + ['--draft_steps', '8'], tmp_path, 'pair')
    assert np.array_equal(tokens_of(infer_CoDe, vae + ['--schedule', f'{a}:8,{b}'], tmp_path, 's2'), pair)
    six = tokens_of(infer_CoDe, vae + ['--schedule', f'{a}:6,{b}'], tmp_path, 'six')
    assert np.array_equal(tokens_of(infer_CoDe, vae + ['--schedule', f'{a}:6,{b}:8,{b}'], tmp_path, 'split'), six)
    cascade = tokens_of(infer_CoDe, vae + ['--schedule', f'{a}:6,{m}:8,{b}'], tmp_path, 'cascade')
    assert np.array_equal(cascade[:, :91], six[:, :91]), 'the drafter decides scales 1-6 alike'
    assert not np.array_equal(cascade, six)


def test_bad_schedules(checkpoints, tmp_path, capsys, monkeypatch):
    import torch as t
    from models import VAR
    from utils import checkpoints as ck
    monkeypatch.chdir(tmp_path)
    a, b = checkpoints['drafter'], checkpoints['refiner']
    small_vocab = tmp_path / 'v512.pth'
    t.save(VAR(depth=1, embed_dim=64, num_heads=1, vocab_size=512).state_dict(), small_vocab)
    cases = [
        (f'{a}:6,{b}:6,{b}', 'must increase strictly within 1-9'),
        (f'{a}:0,{b}', 'must increase strictly'),
        (f'{a}:10,{b}', 'must increase strictly'),
        (f'{a},{b}', 'needs the scale it stops before'),
        (f'{a}:6,{b}:8', 'the last model runs to the end'),
        (f'{a}:6,,{b}', 'empty entry'),
        (f'/no/such.pth:6,{b}', 'checkpoint not found: /no/such.pth'),
        (f'{a}:6,{small_vocab}', 'the refiner (v512.pth) has vocab_size (tokens) 512'),
    ]
    for schedule, message in cases:
        assert message in user_error(infer_CoDe, ['--vae_ckpt', checkpoints['vae'], '--schedule', schedule], capsys), schedule
    assert 'replaces --draft_steps' in user_error(infer_CoDe, ['--schedule', f'{a}:6,{b}', '--draft_steps', '6'], capsys)
    monkeypatch.setattr(ck, 'download', lambda *a: pytest.fail('nothing may be downloaded'))
    assert 'no official VAR of depth 12' in user_error(infer_CoDe, ['--schedule', 'd30:6,d12:8,d16'], capsys)
