"""sample_CoDe.py: the reference's FID procedure reproduced, exact class counts and order, the
batch seeding scheme, resuming after Ctrl-C and after crashes mid-write, a finished run left alone,
torchrun splitting the work, autocast, and one-line errors."""
import contextlib
import io
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

import sample_CoDe
from conftest import ROOT, run_main, user_error
from models import Stage, code_schedule, generate


ENV = dict(os.environ)  # one thread per process (conftest): two would oversubscribe the shared cores


def local(checkpoints):
    return ['--drafter_ckpt', checkpoints['drafter'], '--refiner_ckpt', checkpoints['refiner'], '--vae_ckpt', checkpoints['vae']]


def command(checkpoints, out, *args):
    return [sys.executable, str(ROOT / 'sample_CoDe.py'), *local(checkpoints), '--output_path', str(out), *args]


def sample_here(checkpoints, out, *args):
    """main() in this process (no interpreter start-up to pay), on one thread as the subprocesses;
    returns what it printed."""
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        run_main(sample_CoDe, [*local(checkpoints), '--output_path', str(out), *args])
    return stdout.getvalue()


def reference_tokens(models, labels, seed, schedule=None):
    """Tokens of one batch sampled by generate() directly, with sample_CoDe.py's default settings."""
    vae, drafter, refiner = models
    with torch.inference_mode():
        tokens, _ = generate(schedule or code_schedule(drafter, refiner, 8), vae, torch.tensor(labels), seed=seed, cfg=1.5,
                             top_k=[600] * 10, top_p=0.96, temp=[1.1] * 7 + [1.0] * 3)
    return tokens.numpy()


def messages(stderr):
    """The lines on stderr other than the progress bar's."""
    return [line for line in stderr.split('\n') if line.strip() and 'img' not in line]


# Classes 3, 7, 5, three images each, batches of two: six batches, (j, [3, 7]) and (j, [5]) for j = 0, 1, 2.
SETTINGS = ['--classes', '3,7,5', '--images_per_class', '3', '--batch_size', '2', '--seed', '10']


def test_reproduces_the_reference_sample_procedure(checkpoints, golden, tmp_path):
    """--batch_size 1 --seed 0: image j of class c sampled alone with seed j, as the reference."""
    _, expected = golden
    sample_here(checkpoints, tmp_path / 'ref', '--classes', '0-1', '--images_per_class', '2', '--batch_size', '1', '--seed', '0')
    saved = np.load(tmp_path / 'ref.npz')
    assert saved['labels'].tolist() == expected['sample_labels'].tolist() == [0, 0, 1, 1]
    assert saved['arr_0'].dtype == np.uint8 and saved['arr_0'].shape == (4, 256, 256, 3)
    assert np.abs(saved['arr_0'].astype(int) - expected['sample_arr_0'].astype(int)).max() <= 1


@pytest.fixture(scope='module')
def batched(checkpoints, tmp_path_factory):
    """The uninterrupted one-process result every variant must equal."""
    out = tmp_path_factory.mktemp('batched') / 'run'
    stdout = sample_here(checkpoints, out, *SETTINGS)
    return out, dict(np.load(f'{out}.npz')), stdout


def test_counts_order_and_the_seeding_scheme(batched, models, checkpoints):
    out, saved, stdout = batched
    assert saved['labels'].tolist() == [3, 3, 3, 7, 7, 7, 5, 5, 5]
    assert saved['arr_0'].shape == (9, 256, 256, 3) and saved['tokens'].shape == (9, 680)
    assert 'done: 9 images (9 sampled now)' in stdout and str(out) + '.npz' in stdout
    # image 2 of classes 3 and 7 is the batch (j=2, [3, 7]), seeded 10 + 2: rows 2 and 5, class-major
    assert np.array_equal(saved['tokens'][[2, 5]], reference_tokens(models, [3, 7], seed=12))
    manifest = (out / 'manifest.json').read_text()
    assert json.loads(manifest)['batch_size'] == 2 and json.loads(manifest)['classes'] == [3, 7, 5]
    assert os.path.dirname(checkpoints['vae']) not in manifest, 'the weights are keyed by content, not by path'


def test_ctrl_c_keeps_finished_batches_and_a_rerun_with_moved_checkpoints_continues(checkpoints, batched, tmp_path):
    out = tmp_path / 'interrupted'
    proc = subprocess.Popen(command(checkpoints, out, *SETTINGS), cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    batches = out / 'batches'
    deadline = time.time() + 120
    while time.time() < deadline and len(list(batches.glob('*.images.npy')) if batches.exists() else []) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate()[1]
    assert proc.returncode == 130, err
    finished = {p.name: p.stat().st_mtime_ns for p in batches.glob('*.images.npy')}
    assert 2 <= len(finished) < 6, 'the run must be interrupted part-way'
    assert messages(err) == [f'sample_CoDe.py: interrupted; {len(finished)} of 6 batches are saved in {batches}; '
                     'rerun the same command to resume'], err
    assert not (tmp_path / 'interrupted.npz').exists()

    moved = {k: str(shutil.copy(v, tmp_path / os.path.basename(v))) for k, v in checkpoints.items()}  # same weights, new paths
    stdout = sample_here(moved, out, *SETTINGS)
    assert f'{sum(1 if "_00005." in n else 2 for n in finished)} already done' in stdout
    assert {n: (batches / n).stat().st_mtime_ns for n in finished} == finished, 'finished batches are not redone'
    saved = np.load(tmp_path / 'interrupted.npz')
    assert np.array_equal(saved['tokens'], batched[1]['tokens'])
    assert np.abs(saved['arr_0'].astype(int) - batched[1]['arr_0'].astype(int)).max() <= 1


def test_two_processes_under_torchrun_split_the_work_and_sample_the_same_tokens(checkpoints, batched, tmp_path):
    out = tmp_path / 'ddp'
    settings = [*SETTINGS[:2], '--images_per_class', '1', *SETTINGS[4:]]  # image 0: two of the six batches, one per process
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        *command(checkpoints, out, '--device', 'cpu', *settings)[1:]],
                       capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr
    # each image sampled once, by one process or the other; only rank 0 reports
    assert r.stdout.count('done: 3 images (3 sampled now)') == 1, r.stdout
    saved, rows = np.load(f'{out}.npz'), [0, 3, 6]
    assert np.array_equal(saved['labels'], batched[1]['labels'][rows])
    assert np.array_equal(saved['tokens'], batched[1]['tokens'][rows])
    # the same tokens; the decode's float rounding may move a pixel by one level
    assert np.abs(saved['arr_0'].astype(int) - batched[1]['arr_0'][rows].astype(int)).max() <= 1


def test_a_three_model_cascade_under_torchrun(checkpoints, models, tmp_path):
    """--schedule drafter:6,middle:8,refiner with two processes: the manifest records the stops, and the
    tokens are those generate() samples with that schedule."""
    import tiny
    out = tmp_path / 'cascade'
    schedule = f'{checkpoints["drafter"]}:6,{checkpoints["middle"]}:8,{checkpoints["refiner"]}'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(ROOT / 'sample_CoDe.py'),
                        '--schedule', schedule, '--vae_ckpt', checkpoints['vae'], '--output_path', str(out), '--device', 'cpu',
                        *SETTINGS[:2], '--images_per_class', '1', *SETTINGS[4:]], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr
    assert 'cascade: VAR-d2 scales 1-6, VAR-d1 scales 7-8, VAR-d1 scales 9-10' in r.stdout
    assert json.loads((out / 'manifest.json').read_text())['stops'] == [6, 8, 10]
    vae, drafter, refiner = models
    stages = [Stage(drafter, 6), Stage(tiny.tiny_middle(), 8), Stage(refiner, 10)]
    expected = np.concatenate([reference_tokens(models, [3, 7], 10, stages), reference_tokens(models, [5], 10, stages)])
    saved = np.load(f'{out}.npz')
    assert saved['labels'].tolist() == [3, 7, 5] and np.array_equal(saved['tokens'], expected)


def test_rerun_with_other_settings_device_or_precision_is_refused(checkpoints, batched, capsys):
    err = user_error(sample_CoDe, local(checkpoints) + ['--output_path', str(batched[0]), *SETTINGS,
                                                        '--cfg', '2.0', '--temp', '1.0', '--dtype', 'bf16'], capsys)
    assert 'other settings (cfg, dtype, temp;' in err and 'precision round differently' in err


def test_a_crash_while_saving_leaves_no_file_a_rerun_trusts_and_a_finished_run_is_left_alone(checkpoints, capsys, tmp_path,
                                                                                          monkeypatch):
    out, npz = tmp_path / 'run', tmp_path / 'run.npz'
    one = ['--classes', '3', '--images_per_class', '1']  # one batch
    real_save, real_load = np.save, np.load

    def half_save(f, array):  # the disk fills up half-way through the images
        if array.ndim != 4:
            return real_save(f, array)
        f.write(b'\x93NUMPY half a batch')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(np, 'save', half_save)
    err = user_error(sample_CoDe, local(checkpoints) + ['--output_path', str(out), *one], capsys)
    assert 'could not save batch 00000_00003' in err and 'No space left on device' in err and 'rerun' in err
    assert not list((out / 'batches').glob('*.images.npy')), 'no half batch file under a name a rerun trusts'

    npz_named_while_written = []

    def interrupted_load(path, *a, **k):  # Ctrl-C (or a kill) once the images are in the npz, before its tokens
        if str(path).endswith('.tokens.npy'):
            npz_named_while_written.append(npz.exists())
            raise KeyboardInterrupt
        return real_load(path, *a, **k)
    monkeypatch.setattr(np, 'save', real_save)
    monkeypatch.setattr(np, 'load', interrupted_load)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(sample_CoDe, local(checkpoints) + ['--output_path', str(out), *one])
    captured = capsys.readouterr()
    assert e.value.code == 130 and '0 already done' in captured.out
    assert messages(captured.err) == [f'sample_CoDe.py: interrupted; 1 of 1 batches are saved in {out / "batches"}; rerun the same command to resume']
    assert npz_named_while_written == [False] and not npz.exists(), 'a half npz never has the final name'
    assert {p.name for p in tmp_path.iterdir()} == {'run'}, 'nor is it left under another'

    def wrong_npz(path, arrays, check):  # an assembly bug, or a disk that corrupts it: the check must catch it
        real_write(path, {**arrays, 'labels': ((1,), np.int64, [np.array([4])])}, check)
    monkeypatch.setattr(np, 'load', real_load)
    real_write = sample_CoDe.io.write_npz_streaming
    monkeypatch.setattr(sample_CoDe.io, 'write_npz_streaming', wrong_npz)
    with pytest.raises(RuntimeError, match='failed its check'):
        sample_here(checkpoints, out, *one)
    assert {p.name for p in tmp_path.iterdir()} == {'run'}, 'a wrong npz is not kept, under any name'

    monkeypatch.setattr(sample_CoDe.io, 'write_npz_streaming', real_write)
    assert 'done: 1 images (0 sampled now)' in sample_here(checkpoints, out, *one)
    assert np.load(npz)['arr_0'].shape == (1, 256, 256, 3)

    # DIR/batches may go once DIR.npz exists: the rerun says it is done and leaves the npz alone
    shutil.rmtree(out / 'batches')
    mtime = npz.stat().st_mtime_ns
    assert f'already done: {npz} holds the 1 images of these settings; nothing sampled' in sample_here(checkpoints, out, *one)
    assert npz.stat().st_mtime_ns == mtime and not (out / 'batches').exists()

    # an npz that is not this run's result is neither trusted nor overwritten
    np.savez(npz, arr_0=np.zeros((0, 256, 256, 3), np.uint8), tokens=np.zeros((1, 680), np.int32), labels=np.array([3]))
    mtime = npz.stat().st_mtime_ns
    assert 'is not this run\'s result' in user_error(sample_CoDe, local(checkpoints) + ['--output_path', str(out), *one], capsys)
    assert npz.stat().st_mtime_ns == mtime


def test_sampling_runs_under_autocast_in_the_chosen_dtype(checkpoints, capsys, tmp_path, monkeypatch):
    seen = []

    def spy(*args, **kwargs):  # then Ctrl-C, to spare the sampling
        seen.append((torch.is_autocast_enabled('cpu'), (torch.ones(2, 2) @ torch.ones(2, 2)).dtype))
        raise KeyboardInterrupt
    monkeypatch.setattr(sample_CoDe, 'sample_one', spy)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(sample_CoDe, local(checkpoints) + ['--output_path', str(tmp_path / 'run'), '--classes', '3', '--images_per_class', '1',
                                                    '--device', 'cpu', '--dtype', 'bf16'])
    err = capsys.readouterr().err
    assert seen == [(True, torch.bfloat16)]
    assert e.value.code == 130 and len(messages(err)) == 1 and 'interrupted; 0 of 1 batches are saved' in err, err


BAD = [
    (['--classes', '998-1000'], 'class 1000 is outside'),
    (['--classes', 'x'], '--classes takes a range'),
    (['--images_per_class', '0'], 'must be >= 1'),
    (['--batch_size', '0'], 'must be >= 1'),
    (['--draft_steps', '11'], '--draft_steps must be in 1-10'),
    (['--output_path', '/no/such/parent/run'], 'cannot write in /no/such/parent'),
    (['--output_path', '/proc/e7'], 'cannot write in /proc'),  # os.access says yes to root there
    (['--output_path', '.'], 'name a work folder'),  # not ../NAME.npz
    (['--output_path', '{tmp}/file'], 'is a file'),
    (['--output_path', '{tmp}/orphan'], 'orphan.npz exists, but not'),  # a finished npz whose manifest is gone
]


@pytest.mark.parametrize('args,message', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_input(args, message, checkpoints, capsys, tmp_path):
    (tmp_path / 'file').write_text('')
    (tmp_path / 'orphan.npz').write_text('')
    args = [a.format(tmp=tmp_path) for a in args]
    assert message in user_error(sample_CoDe, local(checkpoints) + ['--output_path', str(tmp_path / 'run')] + args, capsys)
    assert not (tmp_path / 'run').exists()


def test_too_little_disk_is_refused_before_sampling(checkpoints, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    err = user_error(sample_CoDe, local(checkpoints) + ['--output_path', str(tmp_path / 'run'), '--classes', '0-9', '--save_png'], capsys)
    # 500 images, each in a batch file, a PNG (at most raw size) and the npz: 1500 x 256 x 256 x 3 bytes
    assert '301 MB needed' in err and '500 images' in err  # 1500 x 256 x 256 x 3 bytes with a 2% margin: 300.8 MB
    assert not (tmp_path / 'run' / 'batches').exists()


def test_assembly_holds_few_files_open(tmp_path):
    """A memory map holds its file open: 1,563 batch files of a 50,000-image run must not all be mapped at
    once (the usual limit is 1,024 open files), or the run dies at its very end."""
    import resource
    folder = str(tmp_path / 'run')
    os.makedirs(f'{folder}/batches')
    classes = list(range(200))  # 200 batches of one image: 400 files
    for j, chunk in sample_CoDe.plan(classes, 1, 1):
        name = sample_CoDe.batch_name(j, chunk[0])
        np.save(sample_CoDe.batch_file(folder, name, 'images'), np.full((1, 256, 256, 3), chunk[0], np.uint8))
        np.save(sample_CoDe.batch_file(folder, name, 'tokens'), np.full((1, 680), chunk[0], np.int32))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir('/proc/self/fd')) + 64, hard))
    try:
        sample_CoDe.assemble(folder, classes, 1, 1, f'{folder}.npz')
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    saved = np.load(tmp_path / 'run.npz')
    assert saved['tokens'][:, 0].tolist() == classes and saved['arr_0'][199, 0, 0].tolist() == [199] * 3


def test_a_batch_counts_as_done_only_once_its_tokens_are_saved(checkpoints, capsys, tmp_path, monkeypatch):
    """The images file marks a batch done: it must come after the tokens, or a failed tokens save leaves a
    batch a rerun trusts and whose tokens are missing from the npz."""
    out = tmp_path / 'run'
    one = ['--classes', '3', '--images_per_class', '1']
    real_save = np.save

    def no_tokens(f, array):  # the disk fills up while the tokens are saved
        if array.ndim == 2:
            raise OSError(28, 'No space left on device')
        return real_save(f, array)
    monkeypatch.setattr(np, 'save', no_tokens)
    assert 'could not save batch 00000_00003' in user_error(sample_CoDe, local(checkpoints) + ['--output_path', str(out), *one], capsys)
    assert sample_CoDe.done_batches(str(out)) == set() and not list((out / 'batches').iterdir())
    monkeypatch.setattr(np, 'save', real_save)
    assert '0 already done' in sample_here(checkpoints, out, *one)


# Every flag of sample_CoDe.py, and what changing it on a rerun in the same DIR does: 'refused' (it changes
# the samples, so the manifest keeps it), or 'accepted' (it does not). A flag added without a decision
# here fails test_every_flag_has_a_resume_decision.
RESUME = {
    'draft_steps': ('refused', ['--draft_steps', '6']),
    'seed': ('refused', ['--seed', '11']),
    'cfg': ('refused', ['--cfg', '2.5']),
    'top_k': ('refused', ['--top_k', '500']),
    'top_p': ('refused', ['--top_p', '0.9']),
    'temp': ('refused', ['--temp', '1.0']),
    'more_smooth': ('refused', ['--more_smooth']),
    'dtype': ('refused', ['--dtype', 'bf16']),
    'device': ('refused', 'manifest device=cuda'),  # no GPU here: the first run is made to have been on one
    'images_per_class': ('refused', ['--images_per_class', '2']),
    'classes': ('refused', ['--classes', '3,7']),
    'batch_size': ('refused', ['--batch_size', '1']),
    'drafter_ckpt': ('refused', ['--drafter_ckpt', '{middle}']),
    'refiner_ckpt': ('refused', ['--refiner_ckpt', '{middle}']),
    'vae_ckpt': ('refused', ['--vae_ckpt', '{other_vae}']),
    'schedule': ('refused', ['--schedule', '{drafter}:6,{refiner}']),
    'drafter_depth': ('accepted', ['--drafter_depth', '2']),  # with a file it only checks the file's depth
    'refiner_depth': ('accepted', ['--refiner_depth', '1']),
    'training_free': ('accepted', ['--training_free']),  # it selects hub files; local files are what they are
    'compile': ('accepted', ['--compile']),
    'save_png': ('accepted', ['--save_png']),
    'output_path': ('accepted', None),  # another DIR is another run
    'help': ('accepted', None),
}


def test_every_flag_has_a_resume_decision():
    flags = {a.dest for a in sample_CoDe.parser()._actions}
    assert flags == set(RESUME), f'decide what a rerun with a changed flag does: {flags ^ set(RESUME)}'


@pytest.fixture(scope='module')
def other_vae(tmp_path_factory):
    import tiny
    path = tmp_path_factory.mktemp('other_vae') / 'vae.pth'
    torch.save(tiny.official_state_dict(tiny.apply_rule(tiny.VQVAE(vocab_size=4096, Cvae=32, ch=32), 9)), path)
    return str(path)


def test_a_rerun_is_refused_exactly_when_a_flag_changes_the_samples(checkpoints, other_vae, batched, capsys, tmp_path):
    done, _, _ = batched
    run = tmp_path / 'run'
    shutil.copytree(done, run)
    shutil.copy(f'{done}.npz', f'{run}.npz')
    manifest = run / 'manifest.json'
    first = manifest.read_text()
    paths = dict(checkpoints, other_vae=other_vae)
    for flag, (decision, change) in RESUME.items():
        models = ['--vae_ckpt', checkpoints['vae']] if flag == 'schedule' else local(checkpoints)  # a schedule replaces the pair
        args = models + ['--output_path', str(run), *SETTINGS]
        if change is None:
            continue
        if isinstance(change, str):  # 'manifest KEY=VALUE': the first run was made with that setting
            key, value = change.split()[1].split('=')
            manifest.write_text(json.dumps({**json.loads(first), key: value}))
        else:
            args += [a.format(**paths) for a in change]
        if decision == 'refused':
            assert 'holds a run with other settings' in user_error(sample_CoDe, args, capsys), flag
        else:
            capsys.readouterr()
            run_main(sample_CoDe, args)
            assert 'already done' in capsys.readouterr().out, flag
        manifest.write_text(first)
    # the same two models named as a schedule with the same stop are the same run
    capsys.readouterr()
    run_main(sample_CoDe, ['--schedule', f'{checkpoints["drafter"]}:8,{checkpoints["refiner"]}', '--vae_ckpt', checkpoints['vae'],
                           '--output_path', str(run), *SETTINGS])
    assert 'already done' in capsys.readouterr().out
