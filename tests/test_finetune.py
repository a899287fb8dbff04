"""Specialized fine-tuning (finetune_CoDe.py): the reference's teacher-forcing forward and
distillation loss reproduced through the API and the CLI (tests/fixtures/expected_train.npz),
teacher forcing equal to the cached sampling step, learning, exact resume, torchrun, the written
weights sampling, and one-line errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import finetune_CoDe
import infer_CoDe
import tiny
from conftest import FIXTURES, ROOT, run_main, user_error
from models import VAR, Stage, generate
from utils.checkpoints import read_state_dict
from utils.losses import distillation_loss, role_positions
from utils.train import batch_rows, lr_at

CASES = json.loads((FIXTURES / 'cases_train.json').read_text())
EXPECTED = np.load(FIXTURES / 'expected_train.npz')
LAYOUTS = {'drafter_d2': dict(depth=2, embed_dim=128, num_heads=2), 'refiner_d1': dict(depth=1, embed_dim=64, num_heads=1)}
# subprocesses run with the threads of this process (conftest: 2), so their weights equal the in-process runs' bit for bit
ENV = {**os.environ, 'OMP_NUM_THREADS': str(torch.get_num_threads())}
# torchrun's processes share the cores, one thread each; they are compared within a tolerance
ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}


def build(layout, salt):
    return tiny.apply_rule(VAR(**LAYOUTS[layout]), salt)


def image_folder(folder, images, sizes):
    """The case's images as PNGs, sizes[c] of them in class folder c."""
    k = 0
    for c, n in enumerate(sizes):
        (folder / f'class{c}').mkdir(parents=True)
        for j in range(n):
            Image.fromarray(images[k]).save(folder / f'class{c}' / f'{j}.png')
            k += 1
    return folder


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Checkpoint files of every model the cases name, and one ImageFolder per case."""
    root = tmp_path_factory.mktemp('finetune')
    paths = {'vae': str(root / 'vae.pth')}
    torch.save(tiny.official_state_dict(tiny.tiny_vae()), paths['vae'])
    for layout, salt in {tuple(c[k]) for c in CASES for k in ('student', 'teacher') if c[k]}:
        paths[layout, salt] = str(root / f'{layout}_{salt}.pth')
        torch.save(tiny.official_state_dict(build(layout, salt)), paths[layout, salt])
    for i, case in enumerate(CASES):
        paths[i] = str(image_folder(root / f'data{i}', EXPECTED[f'case{i}_images'], case['folder_sizes']))
    return paths


@pytest.mark.parametrize('i', range(len(CASES)))
def test_api_reproduces_the_reference_forward_and_loss(i, models):
    case = CASES[i]
    student = build(*case['student'])
    teacher = build(*case['teacher']) if case['teacher'] else None
    vae = models[0]
    tokens = torch.from_numpy(EXPECTED[f'case{i}_tokens'].astype(np.int64))
    labels = torch.from_numpy(EXPECTED[f'case{i}_labels'])
    pos = role_positions(case['role'], case['N'], student.begin_ends)
    assert [pos.begin, pos.end] == case['loss_positions'] and student.begin_ends[pos.num_scales - 1][1] == case['mask_l']
    with torch.no_grad():
        inputs = vae.quantize.teacher_inputs(tokens)
        logits = student(labels, inputs, pos.num_scales)
        assert logits.shape == (len(labels), case['mask_l'], 4096)
        at = EXPECTED[f'case{i}_logit_positions']
        torch.testing.assert_close(logits[:, at], torch.from_numpy(EXPECTED[f'case{i}_student_logits']), rtol=0, atol=1e-4)
        # the loss computes the head only where it is taken (head_begin)
        student_rows = student(labels, inputs, pos.num_scales, pos.begin).flatten(0, 1)
        teacher_rows = None if teacher is None else teacher(labels, inputs, pos.num_scales, pos.begin).flatten(0, 1)
        out = distillation_loss(student_rows, tokens[:, pos.begin:pos.end].flatten(), teacher_rows,
                                case['alpha'], case['T'], case['label_smooth'])
    assert out.loss.item() == pytest.approx(float(EXPECTED[f'case{i}_loss']), rel=1e-4)


def test_loss_by_hand():
    """Two rows, vocabulary of 2: CE = mean(-log p_true); KD = T^2 mean(sum p_t log(p_t / p_s))."""
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([0, 1])
    p = 1 / (1 + np.exp(-2.0))  # softmax([2, 0])[0]
    ce = (np.log(2) - np.log(1 - p)) / 2
    q = 1 / (1 + np.exp(-1.0))
    kd = (q * np.log(q / 0.5) + (1 - q) * np.log((1 - q) / 0.5)) / 2
    out = distillation_loss(s, y, t, alpha=0.25, T=1.0)
    assert out.ce.item() == pytest.approx(ce) and out.kd.item() == pytest.approx(kd)
    assert out.loss.item() == pytest.approx(0.25 * kd + 0.75 * ce)
    # T = 2: both softmaxes of logits / 2, times 4; label smoothing 0.2 mixes in the uniform target's CE
    q2 = 1 / (1 + np.exp(-0.5))
    kd2 = 4 * (q2 * np.log(q2 / 0.5) + (1 - q2) * np.log((1 - q2) / 0.5)) / 2  # row 1: teacher = student
    assert distillation_loss(s, y, t, alpha=1.0, T=2.0).loss.item() == pytest.approx(kd2)
    smooth = (0.9 * np.log(2) + 0.1 * np.log(2) + 0.9 * -np.log(1 - p) + 0.1 * -np.log(p)) / 2
    assert distillation_loss(s, y, label_smooth=0.2).loss.item() == pytest.approx(smooth)


@pytest.mark.parametrize('which', ['drafter', 'refiner'])
def test_teacher_forcing_equals_the_cached_sampling_step(models, which):
    """Sample with the KV cache (cfg 0, so each step returns the class-conditional logits), then run
    teacher forcing on the sampled tokens: the same logits at every position."""
    vae, drafter, refiner = models
    model = drafter if which == 'drafter' else refiner
    labels = torch.tensor([5, 999])
    seen = []
    step = model.step
    model.step = lambda *a, **k: (lambda out: (seen.append(out), out)[1])(step(*a, **k))
    try:
        tokens, _ = generate([Stage(model, 10)], vae, labels, seed=7, cfg=0.0, top_k=100, top_p=0.9)
    finally:
        del model.step
    with torch.no_grad():
        logits = model(labels, vae.quantize.teacher_inputs(tokens))
    torch.testing.assert_close(logits, torch.cat(seen, dim=1), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the drafter's shorter forward (mask_l) gives the same logits of its scales
        torch.testing.assert_close(model(labels, vae.quantize.teacher_inputs(tokens), 6), logits[:, :91], rtol=1e-5, atol=1e-5)


def test_schedule_and_data_order():
    assert lr_at(0, 1.0, 0.1, 4, 10) == pytest.approx(0.25) and lr_at(3, 1.0, 0.1, 4, 10) == 1.0
    assert lr_at(7, 1.0, 0.1, 4, 10) == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 0.5)))
    assert lr_at(10, 1.0, 0.1, 4, 10) == pytest.approx(0.1)
    # every row once per epoch, batches running across the epoch boundary
    rows = np.concatenate([batch_rows(s, 3, 5, 0) for s in range(5)])
    assert sorted(rows[:5]) == sorted(rows[5:10]) == list(range(5)) and rows[:5].tolist() != rows[5:10].tolist()


def finetune(files, case, out, *extra):
    c = CASES[case]
    args = ['--role', c['role'], '--student_ckpt', files[tuple(c['student'])], '--vae_ckpt', files['vae'],
            '--teacher_ckpt', files[tuple(c['teacher'])] if c['teacher'] else 'none', '--data', files[case],
            '--output_dir', str(out), '--device', 'cpu', '--dtype', 'fp32', '--workers', '0']
    if c['role'] != 'all':
        args += ['--draft_steps', str(c['N'])]
    return args + [str(a) for a in extra]


def read_log(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


@pytest.mark.parametrize('i', range(len(CASES)))
def test_cli_step_zero_loss_is_the_reference_loss(i, files, tmp_path):
    c = CASES[i]
    run_main(finetune_CoDe, finetune(files, i, tmp_path, '--batch_size', sum(c['folder_sizes']), '--cond_drop', 0,
                                     '--total_steps', 1, '--alpha', c['alpha'], '--kd_temp', c['T'], '--label_smooth', c['label_smooth']))
    log = read_log(tmp_path)
    assert [e['step'] for e in log] == [0]
    assert log[0]['loss'] == pytest.approx(float(EXPECTED[f'case{i}_loss']), rel=1e-4)
    assert (log[0]['kd'] is None) == (c['teacher'] is None)


def test_training_lowers_the_loss(files, tmp_path):
    """25 steps on the three images of case 3, the drafter's small scales: the loss falls clearly, and
    so does the validation CE on the same images (--val_data), scale by scale."""
    run_main(finetune_CoDe, ['--role', 'drafter', '--draft_steps', '5', '--student_ckpt', files['refiner_d1', 2],
                             '--vae_ckpt', files['vae'], '--data', files[3], '--output_dir', str(tmp_path),
                             '--total_steps', '25', '--warmup_steps', '3', '--lr', '3e-3', '--cond_drop', '0', '--device', 'cpu',
                             '--workers', '0', '--batch_size', '3', '--val_data', files[3], '--val_every', '8'])
    log = read_log(tmp_path)
    assert [e['step'] for e in log] == list(range(25))
    assert log[-1]['loss'] < 0.5 * log[0]['loss'], [round(e['loss'], 3) for e in log]
    assert [e['step'] for e in log if 'val_ce' in e] == [7, 15, 23, 24]
    first, last = log[7], log[-1]
    assert len(last['val_ce']) == len(last['val_acc']) == 10
    assert all(b < a for a, b in zip(first['val_ce'][:5], last['val_ce'][:5])), (first['val_ce'], last['val_ce'])
    assert sum(last['val_acc'][:5]) > sum(first['val_acc'][:5])
    for key in ('ce', 'lr', 'grad_norm', 'images_per_s', 'data_s', 'step_s'):
        assert key in log[0]


# resume, kill and torchrun share one run: a depth-1 drafter for 6 scales distilled from the depth-2 VAR,
# 4 images and their mirror images in batches of 2 (an epoch boundary inside), class dropout on
def shared_run(files, out, cache, *extra):
    return ['--role', 'drafter', '--draft_steps', '6', '--student_ckpt', files['refiner_d1', 2], '--teacher_ckpt',
            files['drafter_d2', 1], '--vae_ckpt', files['vae'], '--data', files[2], '--output_dir', str(out), '--device', 'cpu',
            '--workers', '0', '--batch_size', '2', '--total_steps', '5', '--warmup_steps', '2', '--lr', '1e-3',
            '--cond_drop', '0.5', '--token_cache', str(cache), '--hflip', *[str(a) for a in extra]]


@pytest.fixture(scope='module')
def uninterrupted(files, tmp_path_factory):
    root = tmp_path_factory.mktemp('uninterrupted')
    run_main(finetune_CoDe, shared_run(files, root / 'run', root / 'cache'))
    return root, read_state_dict(str(root / 'run' / 'weights.pth')), read_log(root / 'run')


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_stop_and_rerun_gives_the_uninterrupted_weights(files, uninterrupted, capsys):
    root, weights, log = uninterrupted
    out = root / 'resumed'
    run_main(finetune_CoDe, shared_run(files, out, root / 'cache', '--max_steps', 2))
    assert [e['step'] for e in read_log(out)] == [0, 1]
    assert 'other settings (lr;' in user_error(finetune_CoDe, shared_run(files, out, root / 'cache', '--lr', 2e-3), capsys)
    moved = dict(files)  # the checkpoints copied elsewhere: the run is keyed on their content, not their paths
    for key in (('refiner_d1', 2), ('drafter_d2', 1), 'vae'):
        moved[key] = str(root / f'moved_{os.path.basename(files[key])}')
        shutil.copy(files[key], moved[key])
    run_main(finetune_CoDe, shared_run(moved, out, root / 'cache', '--max_steps', 5, '--save_every', 2))
    assert_same_weights(read_state_dict(str(out / 'weights.pth')), weights)
    assert read_log(out) == [{**a, **{k: b[k] for k in ('images_per_s', 'data_s', 'step_s')}} for a, b in zip(log, read_log(out))]
    assert [e['lr'] for e in log] == [lr_at(s, 1e-3, 0.0, 2, 5) for s in range(5)] and all(e['kd'] > 0 for e in log)


def test_a_killed_run_loses_at_most_the_unsaved_steps(files, uninterrupted, tmp_path):
    root, weights, _ = uninterrupted
    cmd = [sys.executable, str(ROOT / 'finetune_CoDe.py'), *shared_run(files, tmp_path, root / 'cache', '--save_every', 1)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / 'log.jsonl').exists() and len(read_log(tmp_path)) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(tmp_path / 'state.pth', weights_only=True)['step']
    assert 1 <= saved < 5 and not (tmp_path / 'weights.pth').exists(), 'killed part-way, with a state saved'
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr
    assert f'(resumed at {saved})' in r.stdout
    assert [e['step'] for e in read_log(tmp_path)] == list(range(5))
    assert_same_weights(read_state_dict(str(tmp_path / 'weights.pth')), weights)


@pytest.mark.parametrize('mode', [[], ['--fsdp', '--grad_ckpt']], ids=['ddp', 'fsdp2+grad_ckpt'])
def test_two_processes_under_torchrun_give_the_one_process_weights(files, uninterrupted, tmp_path, mode):
    """Half the global batch on each of two processes (gloo): DDP, and FSDP2 sharding with activation checkpointing."""
    root, weights, log = uninterrupted
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(ROOT / 'finetune_CoDe.py'), *shared_run(files, tmp_path / 'run', root / 'cache', *mode)],
                       capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('done: 5 of 5 steps') == 1, 'only rank 0 reports'
    assert_same_weights(read_state_dict(str(tmp_path / 'run' / 'weights.pth')), weights, atol=1e-5)
    assert [a['loss'] for a in read_log(tmp_path / 'run')] == pytest.approx([b['loss'] for b in log], rel=1e-5)


def test_gradient_accumulation_and_checkpointing_change_nothing_but_memory(files, uninterrupted, tmp_path):
    root, weights, log = uninterrupted
    run_main(finetune_CoDe, shared_run(files, tmp_path, root / 'cache', '--grad_accum', 2, '--grad_ckpt'))
    assert_same_weights(read_state_dict(str(tmp_path / 'weights.pth')), weights, atol=1e-5)
    assert [a['loss'] for a in read_log(tmp_path)] == pytest.approx([b['loss'] for b in log], rel=1e-5)


def test_the_written_weights_sample_through_infer_code(files, uninterrupted, tmp_path, capsys):
    root, _, _ = uninterrupted
    run_main(infer_CoDe, ['--drafter_ckpt', str(root / 'run' / 'weights.pth'), '--refiner_ckpt', files['drafter_d2', 1],
                          '--vae_ckpt', files['vae'], '--draft_steps', '6', '--class_labels', '0,1', '--repeats', '1',
                          '--device', 'cpu', '--output', str(tmp_path / 'grid.png'), '--save_npz', str(tmp_path / 's.npz')])
    assert np.load(tmp_path / 's.npz')['tokens'].shape == (2, 680)
    assert 'VAR-d1 drafts 6 scales, VAR-d2 refines' in capsys.readouterr().out


def bad_folders(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'noimages' / 'class0').mkdir(parents=True)
    (tmp_path / 'noimages' / 'class0' / 'notes.txt').write_text('x')
    (tmp_path / 'broken' / 'class0').mkdir(parents=True)
    (tmp_path / 'broken' / 'class0' / 'a.png').write_bytes(b'not a png')
    (tmp_path / 'a_file').write_text('x')


BAD = [
    (['--data', '{tmp}/missing'], '--data {tmp}/missing: no such folder'),
    (['--data', '{tmp}/empty'], 'no class folders'),
    (['--data', '{tmp}/noimages'], 'class folder class0 holds no images'),
    (['--data', '{tmp}/broken'], 'cannot read image {tmp}/broken/class0/a.png'),
    (['--draft_steps', '10'], '--draft_steps must be in 1-9'),
    (['--draft_steps', '0'], '--draft_steps must be in 1-9'),
    (['--student_ckpt', '{vae}'], 'is a VQVAE checkpoint, expected a VAR one'),
    (['--teacher_ckpt', '{vae}'], 'is a VQVAE checkpoint, expected a VAR one'),
    (['--teacher_ckpt', '{other_vocab}'], 'differ in vocabulary or scales'),
    (['--alpha', '1.5'], '--alpha must be in [0, 1]'),
    (['--lr', '0'], '--lr must be > 0'),
    (['--kd_temp', '-1'], '--kd_temp must be > 0'),
    (['--batch_size', '0'], '--batch_size must be > 0'),
    (['--batch_size', '4', '--grad_accum', '3'], 'not divisible by --grad_accum 3'),
    (['--output_dir', '{tmp}/a_file/run'], '--output_dir {tmp}/a_file/run: cannot create it'),
    (['--fsdp'], '--fsdp shards across processes'),
]


@pytest.mark.parametrize('args,message', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_input(args, message, files, tmp_path, capsys):
    bad_folders(tmp_path)
    other = tmp_path / 'other_vocab.pth'
    torch.save(tiny.official_state_dict(VAR(depth=1, embed_dim=64, num_heads=1, vocab_size=1024)), other)
    fill = lambda s: s.format(tmp=tmp_path, vae=files['vae'], other_vocab=other)
    base = finetune(files, 2, tmp_path / 'out', '--batch_size', 4, '--total_steps', 1)
    err = user_error(finetune_CoDe, base + [fill(a) for a in args], capsys)
    assert fill(message) in err
    assert not (tmp_path / 'out' / 'weights.pth').exists()


def test_a_global_batch_not_divisible_by_the_processes_is_refused(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    err = user_error(finetune_CoDe, finetune(files, 2, tmp_path, '--batch_size', 4), capsys)
    assert '--batch_size 4 is not divisible by the 3 processes' in err
