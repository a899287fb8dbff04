"""Specialized fine-tuning (finetune_CoDe.py) end to end: the reference's teacher-forcing forward and
distillation loss reproduced through the API and the CLI (tests/fixtures/expected_train.npz),
teacher forcing equal to the cached sampling step, learning, exact resume (with a non-finite step
skipped on purpose), torchrun, the non-finite guard, fp16 loss scaling, the written weights in the
official layout, and one-line errors. The recipe's parts one by one: test_finetune_recipe.py."""
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
import nonfinite
import tiny
import training.loop as loop
from conftest import FIXTURES, ROOT, run_main, user_error
from models import VAR, Stage, generate
from training.data import imagenet_synsets
from training.losses import distillation_loss, role_positions
from utils.checkpoints import read_state_dict

CASES = json.loads((FIXTURES / 'cases_train.json').read_text())
EXPECTED = np.load(FIXTURES / 'expected_train.npz')
LAYOUT = json.loads((FIXTURES / 'checkpoint_layout.json').read_text())
LAYOUTS = {'drafter_d2': dict(depth=2, embed_dim=128, num_heads=2), 'refiner_d1': dict(depth=1, embed_dim=64, num_heads=1)}
SYNSETS = imagenet_synsets()
ENV = dict(os.environ)  # one thread, as this process (conftest), so that their weights equal the in-process runs' bit for bit


def build(layout, salt):
    return tiny.apply_rule(VAR(**LAYOUTS[layout]), salt)


def image_folder(folder, images, sizes):
    """The case's images as PNGs, sizes[c] of them in class folder c, named by ImageNet's c-th synset (so
    that its class index is c, as the reference's labels)."""
    k = 0
    for c, n in enumerate(sizes):
        (folder / SYNSETS[c]).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(images[k]).save(folder / SYNSETS[c] / f'{j}.png')
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
    """Eval mode (no drop path), as the reference's fixtures were made."""
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


def finetune(files, case, out, *extra):
    """The case's run: its 256x256 images as they are (--crop none) and no drop path, as the reference's loss."""
    c = CASES[case]
    args = ['--role', c['role'], '--student_ckpt', files[tuple(c['student'])], '--vae_ckpt', files['vae'],
            '--teacher_ckpt', files[tuple(c['teacher'])] if c['teacher'] else 'none', '--data', files[case],
            '--output_dir', str(out), '--device', 'cpu', '--dtype', 'fp32', '--workers', '0', '--crop', 'none', '--drop_path', '0']
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
    assert json.loads((tmp_path / 'classes.json').read_text()) == {SYNSETS[k]: k for k in range(len(c['folder_sizes']))}


def test_training_lowers_the_loss(files, tmp_path):
    """15 steps on the three images of case 3, the drafter's small scales: the loss falls clearly, and
    so does the validation CE on the same images (--val_data), scale by scale."""
    run_main(finetune_CoDe, ['--role', 'drafter', '--draft_steps', '5', '--student_ckpt', files['refiner_d1', 2],
                             '--vae_ckpt', files['vae'], '--data', files[3], '--output_dir', str(tmp_path), '--crop', 'none',
                             '--total_steps', '15', '--warmup', '2', '--blr', '0.3', '--sched', 'cos', '--cond_drop', '0',
                             '--device', 'cpu', '--workers', '0', '--batch_size', '3', '--val_data', files[3], '--val_every', '6'])
    log = read_log(tmp_path)
    assert [e['step'] for e in log] == list(range(15))
    assert log[-1]['loss'] < 0.5 * log[0]['loss'], [round(e['loss'], 3) for e in log]
    assert [e['step'] for e in log if 'val_ce' in e] == [5, 11, 14]
    first, last = log[5], log[-1]
    assert len(last['val_ce']) == len(last['val_acc']) == 10
    assert all(b < a for a, b in zip(first['val_ce'][:5], last['val_ce'][:5])), (first['val_ce'], last['val_ce'])
    assert sum(last['val_acc'][:5]) > sum(first['val_acc'][:5])
    for key in ('ce', 'lr', 'wd', 'grad_norm', 'images_per_s', 'data_s', 'step_s'):
        assert key in log[0]


# resume, kill and torchrun share one run: a depth-2 drafter for 6 scales distilled from the depth-1 VAR,
# 4 images and their mirror images (VAR's centre crop, cached) in batches of 2 (an epoch boundary inside),
# class dropout and drop path on, and a non-finite gradient put in at step 2 on the last process
INJECT_AT = 2


def shared_run(files, out, cache, *extra):
    return ['--role', 'drafter', '--draft_steps', '6', '--student_ckpt', files['drafter_d2', 1], '--teacher_ckpt',
            files['refiner_d1', 2], '--vae_ckpt', files['vae'], '--data', files[2], '--output_dir', str(out), '--device', 'cpu',
            '--workers', '0', '--batch_size', '2', '--total_steps', '5', '--warmup', '2', '--blr', '0.128', '--crop', 'center',
            '--cond_drop', '0.5', '--drop_path', '0.5', '--token_cache', str(cache), '--hflip', *[str(a) for a in extra]]


VAR_NO_DECAY = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start', 'start_pos',
                'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')  # VAR's train.py


def names_of(groups):
    return {n for _, _, names in groups for n in names}


class AdamSpy:
    """What the optimizer sees at each step: the norm of the gradients it applies, and per group the
    learning rate, weight decay and names of the parameters."""

    def __init__(self, model_names):
        self.names, self.seen = model_names, []

    def __call__(self, step):
        def spied(optimizer, *a, **k):
            groups = [(g['lr'], g['weight_decay'], sorted(self.names[id(p)] for p in g['params'])) for g in optimizer.param_groups]
            grads = [p.grad for g in optimizer.param_groups for p in g['params'] if p.grad is not None]
            self.seen.append((float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))), groups))
            return step(optimizer, *a, **k)
        return spied


@pytest.fixture(scope='module')
def uninterrupted(files, tmp_path_factory):
    root = tmp_path_factory.mktemp('uninterrupted')
    names = {}
    load = loop.load_models

    def load_and_name(args, device):
        out = load(args, device)
        names.update({id(p): n for n, p in out[0].named_parameters()})
        return out
    spy = AdamSpy(names)
    with pytest.MonkeyPatch.context() as mp:
        nonfinite.install(mp.setattr, {INJECT_AT}, 0)
        mp.setattr('training.loop.load_models', load_and_name)
        mp.setattr(torch.optim.AdamW, 'step', spy(torch.optim.AdamW.step))
        run_main(finetune_CoDe, shared_run(files, root / 'run', root / 'cache'))
    return root, read_state_dict(str(root / 'run' / 'weights.pth')), read_log(root / 'run'), spy.seen


def numbers(values):
    """Logged numbers, None (a skipped step's loss) as NaN, for pytest.approx(nan_ok=True)."""
    return [float('nan') if v is None else v for v in values]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_a_non_finite_step_is_skipped_and_the_rest_trains(uninterrupted):
    _, weights, log, seen = uninterrupted
    assert [e.get('skipped', False) for e in log] == [s == INJECT_AT for s in range(5)]
    assert len(seen) == 4, 'the optimizer never steps on the skipped one'
    assert log[INJECT_AT]['loss'] is None and log[INJECT_AT]['grad_norm'] is None
    assert all(torch.isfinite(v).all() for k, v in weights.items() if k != 'attn_bias_for_masking')


def test_the_optimizer_sees_clipped_gradients_vars_weight_decay_groups_and_schedule(uninterrupted):
    """--grad_clip 2 (the default): the gradients the optimizer applies have norm <= 2 where the logged
    (pre-clip) norm is larger; weight decay on exactly the parameters VAR's filter_params decays; the lr
    and decay of VAR's lr_wd_annealing at peak = blr x 2 / 256 = 1e-3 (see test_finetune_recipe for the formula)."""
    _, _, log, seen = uninterrupted
    clean = [e for e in log if not e.get('skipped')]
    assert all(e['grad_norm'] > 2 for e in clean), 'the shared run must clip'
    assert [round(n, 5) for n, _ in seen] == [2.0] * 4
    weights = uninterrupted[1]
    for (_, groups), e in zip(seen, clean):
        decayed = sorted(n for lr, wd, names in groups if wd > 0 for n in names)
        # VAR's filter_params: no decay for 1-d tensors, biases and names holding one of its nowd_keys
        by_rule = sorted(n for n in weights if n in names_of(groups) and not (
            weights[n].ndim == 1 or n.endswith('bias') or any(k in n for k in VAR_NO_DECAY)))
        assert decayed == by_rule and 'class_emb.weight' in decayed and 'lvl_embed.weight' not in decayed
        for lr, wd, names in groups:
            assert lr == pytest.approx(e['lr']) and wd == (pytest.approx(0.05) if names[0] in decayed else 0)
    # warm-up over 2 steps from 0.005 of the peak, then lin0: flat for 5% of the rest, linear to wpe (depth 2: 0.1)
    peak = 0.128 * 2 / 256
    assert [e['lr'] for e in log] == pytest.approx([0.005 * peak, (0.005 + 0.995 / 2) * peak, peak,
                                                   (0.1 + 0.9 * 0.5 / 0.95) * peak, 0.1 * peak])


def test_stop_and_rerun_gives_the_uninterrupted_weights(files, uninterrupted, capsys, monkeypatch):
    root, weights, log, _ = uninterrupted
    nonfinite.install(monkeypatch.setattr, {INJECT_AT}, 0)
    out = root / 'resumed'
    run_main(finetune_CoDe, shared_run(files, out, root / 'cache', '--max_steps', 2))
    assert [e['step'] for e in read_log(out)] == [0, 1]
    assert 'other settings (blr;' in user_error(finetune_CoDe, shared_run(files, out, root / 'cache', '--blr', 0.2), capsys)
    moved = dict(files)  # the checkpoints copied elsewhere: the run is keyed on their content, not their paths
    for key in (('refiner_d1', 2), ('drafter_d2', 1), 'vae'):
        moved[key] = str(root / f'moved_{os.path.basename(files[key])}')
        shutil.copy(files[key], moved[key])
    run_main(finetune_CoDe, shared_run(moved, out, root / 'cache', '--max_steps', 5, '--save_every', 2))
    assert_same_weights(read_state_dict(str(out / 'weights.pth')), weights)
    assert read_log(out) == [{**a, **{k: b[k] for k in ('images_per_s', 'data_s', 'step_s')}} for a, b in zip(log, read_log(out))]


def test_a_killed_run_loses_at_most_the_unsaved_steps(files, uninterrupted, tmp_path):
    root, weights, _, _ = uninterrupted
    cmd = [sys.executable, str(ROOT / 'tests' / 'nonfinite.py'), *shared_run(files, tmp_path, root / 'cache', '--save_every', 1)]
    env = {**ENV, 'NONFINITE': f'{INJECT_AT}:0'}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / 'log.jsonl').exists() and len(read_log(tmp_path)) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(tmp_path / 'state.pth', weights_only=True)['step']
    assert 1 <= saved < 5 and not (tmp_path / 'weights.pth').exists(), 'killed part-way, with a state saved'
    dead = 2 ** 30  # what a kill in the middle of a save leaves (pid above any pid_max: that process is gone)
    half = [tmp_path / f'state.pth.{dead}.tmp', tmp_path / f'log.jsonl.{dead}.tmp', root / 'cache' / 'shards' / f'x.npy.{dead}.tmp']
    for path in half + [tmp_path / f'notes.{dead}.tmp']:
        path.write_bytes(b'half')
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert f'(resumed at {saved})' in r.stdout
    assert not any(p.exists() for p in half) and (tmp_path / f'notes.{dead}.tmp').exists(), 'the run\'s own leftovers, only'
    assert [e['step'] for e in read_log(tmp_path)] == list(range(5))
    assert_same_weights(read_state_dict(str(tmp_path / 'weights.pth')), weights)


@pytest.mark.parametrize('mode', [[], ['--fsdp', '--grad_ckpt']], ids=['ddp', 'fsdp2+grad_ckpt'])
def test_two_processes_under_torchrun_give_the_one_process_weights(files, uninterrupted, tmp_path, mode):
    """Half the global batch on each of two processes (gloo): DDP, and FSDP2 sharding with activation
    checkpointing. The second process alone gets the non-finite gradient of step 2: both skip the step,
    and (DDP) end with the same weights."""
    root, weights, log, _ = uninterrupted
    env = {**ENV, 'NONFINITE': f'{INJECT_AT}:1', 'NONFINITE_DUMP': str(tmp_path)}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(ROOT / 'tests' / 'nonfinite.py'), *shared_run(files, tmp_path / 'run', root / 'cache', *mode)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('done: 5 of 5 steps') == 1, 'only rank 0 reports'
    assert '1 non-finite step(s) skipped' in r.stdout
    assert_same_weights(read_state_dict(str(tmp_path / 'run' / 'weights.pth')), weights, atol=1e-5)
    assert numbers(a['loss'] for a in read_log(tmp_path / 'run')) == pytest.approx(numbers(b['loss'] for b in log), rel=1e-5,
                                                                                nan_ok=True)
    if not mode:
        assert_same_weights(torch.load(tmp_path / 'rank0.pth', weights_only=True), torch.load(tmp_path / 'rank1.pth', weights_only=True))


def test_gradient_accumulation_and_checkpointing_change_nothing_but_memory(files, uninterrupted, tmp_path, monkeypatch):
    """Two micro-batches of one row: the same weights, losses and (pre-clip) gradient norms as one of two
    (micro-batch gradients averaged, not summed)."""
    root, weights, log, _ = uninterrupted
    nonfinite.install(monkeypatch.setattr, {INJECT_AT}, 0)
    run_main(finetune_CoDe, shared_run(files, tmp_path, root / 'cache', '--grad_accum', 2, '--grad_ckpt'))
    assert_same_weights(read_state_dict(str(tmp_path / 'weights.pth')), weights, atol=1e-5)
    for key in ('loss', 'grad_norm'):
        assert numbers(a[key] for a in read_log(tmp_path)) == pytest.approx(numbers(b[key] for b in log), rel=1e-5, nan_ok=True)


def official_var_layout(depth):
    """The keys of an official VAR-d{depth} checkpoint, from var_d16's (tests/fixtures/checkpoint_layout.json)."""
    keys = set()
    for k in LAYOUT['var_d16']:
        if not k.startswith('blocks.'):
            keys.add(k)
        elif k.startswith('blocks.0.'):
            keys.update(k.replace('blocks.0.', f'blocks.{i}.', 1) for i in range(depth))
    return keys


def test_weights_pth_has_the_official_layout(uninterrupted):
    """Every key of the official file, the buffers the official VAR registers included, with their values:
    the scale of each of the 680 positions, the block-causal mask (0 = may attend, -inf not), zero key bias."""
    _, weights, _, _ = uninterrupted
    assert set(weights) == official_var_layout(2)
    scale = torch.tensor(sum(([si] * pn * pn for si, pn in enumerate((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))), []))
    assert torch.equal(weights['lvl_1L'], scale.view(1, 680))
    mask = weights['attn_bias_for_masking']
    assert mask.shape == (1, 1, 680, 680) and mask[0, 0, 1, 0].item() == 0 and mask[0, 0, 0, 1].item() == -float('inf')
    assert torch.equal(torch.isinf(mask[0, 0]), scale.view(-1, 1) < scale.view(1, -1))
    assert all(not weights[f'blocks.{i}.attn.zero_k_bias'].any() for i in range(2))
    assert all(v.dtype == torch.float32 for k, v in weights.items() if k != 'lvl_1L')


def test_the_written_weights_sample_through_infer_code(files, uninterrupted, tmp_path, capsys):
    root, _, _, _ = uninterrupted
    run_main(infer_CoDe, ['--drafter_ckpt', str(root / 'run' / 'weights.pth'), '--refiner_ckpt', files['refiner_d1', 2],
                          '--vae_ckpt', files['vae'], '--draft_steps', '6', '--class_labels', '0', '--repeats', '1',
                          '--device', 'cpu', '--output', str(tmp_path / 'grid.png'), '--save_npz', str(tmp_path / 's.npz')])
    assert np.load(tmp_path / 's.npz')['tokens'].shape == (1, 680)
    assert 'VAR-d2 drafts 6 scales, VAR-d1 refines' in capsys.readouterr().out


def small_run(files, out, *extra):
    """A cheap run: the depth-1 VAR on the drafter's 6 scales, case 0's three images as they are."""
    return ['--role', 'drafter', '--draft_steps', '6', '--student_ckpt', files['refiner_d1', 2], '--vae_ckpt', files['vae'],
            '--data', files[0], '--output_dir', str(out), '--device', 'cpu', '--workers', '0', '--batch_size', '2',
            '--total_steps', '4', '--crop', 'none', *[str(a) for a in extra]]


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_state(files, tmp_path, capsys, monkeypatch):
    """Steps 2 and 3 non-finite, --max_skips 2: one line, exit status 1, state.pth still step 2's (saved
    after step 1, every step), finite; no weights.pth."""
    nonfinite.install(monkeypatch.setattr, {2, 3}, 0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(finetune_CoDe, small_run(files, tmp_path, '--save_every', 1, '--max_skips', 2, '--draft_steps', 3))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert '2 steps in a row (2-3) had a non-finite loss or gradient' in err and f'{tmp_path / "state.pth"} (step 2)' in err
    state = torch.load(tmp_path / 'state.pth', weights_only=True)
    assert state['step'] == 2 and all(torch.isfinite(v).all() for v in state['model'].values())
    assert not (tmp_path / 'weights.pth').exists()
    assert [e.get('skipped', False) for e in read_log(tmp_path)] == [False, False, True, True]


def test_non_finite_weights_are_never_saved(files, tmp_path, capsys, monkeypatch):
    """An optimizer step that leaves a NaN weight (step 1): the save after it is refused (exit status 1),
    state.pth stays step 1's."""
    step = torch.optim.AdamW.step
    calls = []

    def step_then_nan(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]['params'][0].view(-1)[0] = float('nan')
        return out
    monkeypatch.setattr(torch.optim.AdamW, 'step', step_then_nan)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(finetune_CoDe, small_run(files, tmp_path, '--save_every', 1, '--draft_steps', 3))
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'not finite after step 1; not saved' in err and err.count('\n') == 1, err
    assert torch.load(tmp_path / 'state.pth', weights_only=True)['step'] == 1


def test_fp16_scales_the_loss_and_resumes_with_its_scale(files, tmp_path, monkeypatch):
    """fp16 autocast (allowed on the CPU here only: runtime() refuses it for users), 3 scales: the loss scale
    starts at 2^11 and the non-finite step 1 halves it (1024); the gradient is unscaled before it is
    measured (step 0's norm is the fp32 run's); a run stopped after step 1 resumes with that scale and ends
    with the weights and log of the uninterrupted run."""
    fp16 = ['--dtype', 'fp16', '--draft_steps', '3', '--total_steps', '3']
    run_main(finetune_CoDe, small_run(files, tmp_path / 'fp32', '--draft_steps', '3', '--total_steps', '1'))
    monkeypatch.setattr(finetune_CoDe, 'runtime', lambda args: (torch.device('cpu'), torch.float16))
    nonfinite.install(monkeypatch.setattr, {1}, 0)
    run_main(finetune_CoDe, small_run(files, tmp_path / 'a', *fp16))
    log = read_log(tmp_path / 'a')
    assert [e['loss_scale'] for e in log] == [2048, 1024, 1024] and [e.get('skipped', False) for e in log] == [False, True, False]
    assert log[0]['grad_norm'] == pytest.approx(read_log(tmp_path / 'fp32')[0]['grad_norm'], rel=0.02)
    run_main(finetune_CoDe, small_run(files, tmp_path / 'b', *fp16, '--max_steps', 2))
    assert float(torch.load(tmp_path / 'b' / 'state.pth', weights_only=True)['scaler']['scale']) == 1024
    run_main(finetune_CoDe, small_run(files, tmp_path / 'b', *fp16))
    assert_same_weights(read_state_dict(str(tmp_path / 'b' / 'weights.pth')), read_state_dict(str(tmp_path / 'a' / 'weights.pth')))
    assert [e['loss_scale'] for e in read_log(tmp_path / 'b')] == [2048, 1024, 1024]


def test_a_run_whose_every_step_was_skipped_saves_no_state(files, tmp_path, monkeypatch):
    """Saving an optimizer that never stepped would give it a step of its own (torch.distributed.checkpoint
    initialises it), and the rerun's Adam would count one step more than an uninterrupted run's."""
    nonfinite.install(monkeypatch.setattr, {0}, 0)
    run_main(finetune_CoDe, small_run(files, tmp_path / 'a', '--draft_steps', 3, '--total_steps', 2))
    run_main(finetune_CoDe, small_run(files, tmp_path / 'b', '--draft_steps', 3, '--total_steps', 2, '--max_steps', 1))
    assert not (tmp_path / 'b' / 'state.pth').exists()
    run_main(finetune_CoDe, small_run(files, tmp_path / 'b', '--draft_steps', 3, '--total_steps', 2))
    assert_same_weights(read_state_dict(str(tmp_path / 'b' / 'weights.pth')), read_state_dict(str(tmp_path / 'a' / 'weights.pth')))


def test_a_cache_made_without_hflip_is_not_used_for_an_hflip_run(files, uninterrupted, tmp_path, capsys):
    root, _, _, _ = uninterrupted
    args = shared_run(files, tmp_path, root / 'cache')
    args.remove('--hflip')
    err = user_error(finetune_CoDe, args, capsys)
    assert f'token cache {root / "cache"} holds a run with other settings (hflip;' in err


def bad_folders(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'noimages' / SYNSETS[0]).mkdir(parents=True)
    (tmp_path / 'noimages' / SYNSETS[0] / 'notes.txt').write_text('x')
    (tmp_path / 'broken' / SYNSETS[0]).mkdir(parents=True)
    (tmp_path / 'broken' / SYNSETS[0] / 'a.png').write_bytes(b'not a png')
    for name in ('n99999999', 'n01440764'):
        (tmp_path / 'not_imagenet' / name).mkdir(parents=True)
        Image.new('RGB', (256, 256)).save(tmp_path / 'not_imagenet' / name / 'a.png')
    for name in ('cats', 'dogs'):
        (tmp_path / 'named' / name).mkdir(parents=True)
        Image.new('RGB', (256, 256)).save(tmp_path / 'named' / name / 'a.png')
    (tmp_path / 'wide' / SYNSETS[0]).mkdir(parents=True)
    Image.new('RGB', (300, 256)).save(tmp_path / 'wide' / SYNSETS[0] / 'a.png')
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'map.json').write_text(json.dumps({'cats': 3, 'dogs': 4, 'birds': 5}))
    (tmp_path / 'bad_map.json').write_text('{"cats": 3,')


BAD = [
    (['--data', '{tmp}/missing'], '--data {tmp}/missing: no such folder'),
    (['--data', '{tmp}/a_file'], '--data {tmp}/a_file is a file; give a folder of class folders'),
    (['--data', '{tmp}/empty'], 'no class folders'),
    (['--data', '{tmp}/noimages'], f'class folder {SYNSETS[0]} holds no images'),
    (['--data', '{tmp}/broken'], f'cannot use image {{tmp}}/broken/{SYNSETS[0]}/a.png'),
    (['--data', '{tmp}/wide'], '300x256, and --crop none takes 256x256 images only'),
    (['--data', '{tmp}/not_imagenet'], 'class folder n99999999 is not one of ImageNet\'s 1,000 synsets; give --class_map FILE'),
    (['--data', '{tmp}/named'], '--data has 2 class folders (cats, dogs), the student 1000 classes'),
    (['--data', '{tmp}/named', '--class_map', '{tmp}/map.json'], 'names 1 folder(s) that --data does not hold: birds'),
    (['--data', '{tmp}/named', '--class_map', '{tmp}/nothing.json'], '--class_map {tmp}/nothing.json: no such file'),
    (['--data', '{tmp}/named', '--class_map', '{tmp}'], '--class_map {tmp} is a folder; give a file'),
    (['--data', '{tmp}/named', '--class_map', '{tmp}/bad_map.json'], 'not a JSON file'),
    (['--draft_steps', '10'], '--draft_steps must be in 1-9'),
    (['--draft_steps', '0'], '--draft_steps must be in 1-9'),
    (['--role', 'refiner', '--student_ckpt', ''], '--role refiner trains stage 2 from stage 1\'s weights: pass --student_ckpt'),
    (['--student_ckpt', '{vae}'], 'is a VQVAE checkpoint, expected a VAR one'),
    (['--student_ckpt', '{tmp}'], '--student_ckpt {tmp} is a folder; give a file'),
    (['--vae_ckpt', '{tmp}/none.pth'], '--vae_ckpt {tmp}/none.pth: no such file'),
    (['--teacher_ckpt', '{vae}'], 'is a VQVAE checkpoint, expected a VAR one'),
    (['--teacher_ckpt', '{other_vocab}'], 'differ in vocabulary or scales'),
    (['--alpha', '1.5'], '--alpha must be in [0, 1]'),
    (['--blr', '0'], '--blr must be > 0'),
    (['--wpe', '1.5'], '--wpe must be in [0, 1]'),
    (['--wpe', '-0.1'], '--wpe must be in [0, 1]'),
    (['--crop', 'random'], "--crop: invalid choice: 'random'"),
    (['--warmup', '1'], '--warmup 1 must end before --total_steps 1'),
    (['--drop_path', '1'], '--drop_path must be < 1'),
    (['--workers', '-1'], '--workers must be >= 0, got -1'),
    (['--encode_batch_size', '0'], '--encode_batch_size must be > 0, got 0'),
    (['--max_skips', '0'], '--max_skips must be > 0'),
    (['--kd_temp', '-1'], '--kd_temp must be > 0'),
    (['--batch_size', '0'], '--batch_size must be > 0'),
    (['--batch_size', '4', '--grad_accum', '3'], 'not divisible by --grad_accum 3'),
    (['--output_dir', '{tmp}/a_file/run'], '--output_dir {tmp}/a_file/run: cannot create it'),
    (['--output_dir', '{tmp}/a_file'], '--output_dir {tmp}/a_file is a file; give a folder'),
    (['--token_cache', '{tmp}/a_file'], '--token_cache {tmp}/a_file is a file; give a folder'),
    (['--fsdp'], '--fsdp shards across processes'),
]


@pytest.mark.parametrize('args,message', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_input(args, message, files, tmp_path, capsys):
    """One line, exit status 2, and (before the images are read) nothing encoded."""
    bad_folders(tmp_path)
    other = tmp_path / 'other_vocab.pth'
    torch.save(tiny.official_state_dict(VAR(depth=1, embed_dim=64, num_heads=1, vocab_size=1024)), other)
    fill = lambda s: s.format(tmp=tmp_path, vae=files['vae'], other_vocab=other)
    base = finetune(files, 2, tmp_path / 'out', '--batch_size', 4, '--total_steps', 1)
    err = user_error(finetune_CoDe, base + [fill(a) for a in args], capsys)
    assert fill(message) in err
    assert not (tmp_path / 'out' / 'weights.pth').exists()
    if 'image' not in message and 'none takes' not in message:
        assert not (tmp_path / 'out' / 'token_cache').exists(), 'refused before any encoding'


def test_a_global_batch_not_divisible_by_the_processes_is_refused(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    err = user_error(finetune_CoDe, finetune(files, 2, tmp_path, '--batch_size', 4), capsys)
    assert '--batch_size 4 is not divisible by the 3 processes' in err
