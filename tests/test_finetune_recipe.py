"""Fine-tuning's recipe, part by part, against FoundationVision/VAR (its lr_wd_annealing, filter_params,
GradScaler use, data augmentation, drop path and README recipes, re-derived here), torchvision's
transforms and ImageNet's class list; and the settings a rerun must keep, flag by flag."""
import argparse
import functools
import json
import math
import os
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets.imagenette import Imagenette
from torchvision.models import ResNet50_Weights

import finetune_CoDe
import tiny
import training.data as data
import training.loop as loop
from conftest import run_main
from models import VAR
from training.data import class_indices, crop_seed, imagenet_synsets, load_view
from training.schedule import LossScaler, lr_wd_at, param_groups, set_lr_wd
from utils.checkpoints import read_state_dict


# ----------------------------------------------------------------------------- schedule and optimizer

def var_lr_wd_annealing(sche_type, peak_lr, wd, wd_end, cur_it, wp_it, max_it, wp0, wpe):
    """VAR's utils/lr_control.py lr_wd_annealing, rewritten for one param group: (lr, wd)."""
    wp_it = round(wp_it)
    if cur_it < wp_it:
        cur_lr = wp0 + (1 - wp0) * cur_it / wp_it
    else:
        pasd = (cur_it - wp_it) / (max_it - 1 - wp_it)
        rest = 1 - pasd
        if sche_type == 'cos':
            cur_lr = wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
        else:  # lin0
            cur_lr = 1 if pasd < 0.05 else wpe + (1 - wpe) * rest / 0.95
    pasd = cur_it / (max_it - 1)
    return cur_lr * peak_lr, wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * pasd))


@pytest.mark.parametrize('sched', ['lin0', 'cos'])
def test_lr_and_weight_decay_are_vars_lr_wd_annealing(sched):
    total, warmup, peak = 1000, 20, 3e-4
    steps = [0, 1, 10, 19, 20, 21, 69, 70, 71, 500, 998, 999]
    for step in steps:
        got = lr_wd_at(step, total, peak, warmup, 0.005, 0.01, sched, 0.05, 0.08)
        assert got == pytest.approx(var_lr_wd_annealing(sched, peak, 0.05, 0.08, step, warmup, total, 0.005, 0.01), rel=1e-12)
    assert lr_wd_at(20, total, peak, warmup, 0.005, 0.01, sched, 0.05, 0.05)[0] == peak, 'the warm-up ends at step 20'
    assert lr_wd_at(19, total, peak, warmup, 0.005, 0.01, sched, 0.05, 0.05)[0] < peak
    assert lr_wd_at(999, total, peak, warmup, 0.005, 0.01, sched, 0.05, 0.08) == pytest.approx((0.01 * peak, 0.08))


def test_param_groups_are_vars_filter_params():
    """No decay where VAR's filter_params gives none (1-d, biases, its nowd_keys), decay elsewhere, the class
    embedding included; set_lr_wd puts the scheduled decay on the decayed group only."""
    model = tiny.tiny_refiner()
    nowd = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start', 'start_pos',
            'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')  # VAR's train.py
    names = {id(p): n for n, p in model.named_parameters()}
    rule = {n for n, p in model.named_parameters() if not (p.ndim == 1 or n.endswith('bias') or any(k in n for k in nowd))}
    groups = param_groups(model, 0.05)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr_wd(optimizer, 0.5, 0.07)
    decayed = {names[id(p)] for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert decayed == rule and 'class_emb.weight' in decayed and 'blocks.0.attn.scale_mul_1H11' not in decayed
    assert {g['weight_decay'] for g in optimizer.param_groups} == {0.07, 0.0} and {g['lr'] for g in optimizer.param_groups} == {0.5}
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))


def parse(*flags):
    args = finetune_CoDe.parser().parse_args(['--role', 'drafter', '--data', 'd', '--output_dir', 'o', *flags])
    args.device, args.dtype = args.device or 'cpu', args.dtype or 'fp32'  # as finetune_CoDe.main on a CPU
    return args


# VAR's README commands and arg_util defaults: --tblr, --wpe, --twd 0.05, --twde (0: = --twd), drop path 0.1 * depth / 24
VAR_RECIPES = {16: (1e-4, 0.1, 0.05, 16 / 240), 20: (1e-4, 0.1, 0.05, 20 / 240), 24: (8e-5, 0.01, 0.05, 24 / 240),
               30: (8e-5, 0.01, 0.08, 30 / 240)}


@pytest.mark.parametrize('depth', VAR_RECIPES)
def test_defaults_by_depth_are_vars_recipes(depth):
    args = loop.resolve_defaults(parse('--total_steps', '5000'), depth)
    blr, wpe, wd_end, drop_path = VAR_RECIPES[depth]
    assert (args.blr, args.wpe, args.wd, args.wd_end) == (blr, wpe, 0.05, wd_end)
    assert args.drop_path == pytest.approx(drop_path) and args.warmup == 100, 'warm-up: VAR\'s ep / 50, 2% of the steps'
    assert loop.resolve_defaults(parse('--blr', '3e-4', '--wd_end', '0.01'), depth).blr == 3e-4


def test_documented_defaults():
    """The README's defaults (VAR's where VAR has the setting: cond_drop_rate 0.1, tclip 2, twd 0.05, wp0 0.005,
    sche lin0, ls 0, AdamW betas 0.9/0.95)."""
    a = parse()
    assert (a.cond_drop, a.grad_clip, a.wd, a.wp0, a.sched, a.label_smooth) == (0.1, 2.0, 0.05, 0.005, 'lin0', 0.0)
    assert (a.crop, a.alpha, a.kd_temp, a.max_skips, a.batch_size, a.seed, a.total_steps, a.draft_steps) == \
        ('var', 0.5, 1.0, 20, 256, 0, 20000, 8)
    assert (a.save_every, a.val_every, a.encode_batch_size, a.grad_accum, a.max_steps, a.hflip, a.fsdp) == \
        (1000, 1000, 64, 1, None, False, False)
    assert (a.blr, a.wpe, a.wd_end, a.drop_path, a.warmup) == (None,) * 5, 'by depth and --total_steps'


def test_loss_scaler_behaves_as_vars_gradscaler():
    """By hand: 2^11 at first; a non-finite step halves it; 1,000 clean steps in a row double it; never above
    2^15. Below the cap, step for step the scale of torch.amp.GradScaler('cpu', init_scale=2**11,
    growth_interval=1000) driven as VAR's AmpOptimizer drives it."""
    s = LossScaler(True)
    assert s.scale == 2048
    s.update(False)
    assert s.scale == 1024
    for _ in range(999):
        s.update(True)
    assert s.scale == 1024
    s.update(True)
    assert s.scale == 2048
    for _ in range(5000):
        s.update(True)
    assert s.scale == 2 ** 15, 'capped'
    assert LossScaler(False).scale == 1.0
    torch_scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 11, growth_interval=1000)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    ours, rng = LossScaler(True), np.random.default_rng(0)
    for i in range(3000):
        finite = bool(rng.random() > 0.0005) if i % 1700 else False
        torch_scaler.scale(p.sum())  # as VAR: scale(loss).backward(), then unscale_, step, update
        p.grad = torch.tensor([1.0 if finite else float('inf')])
        torch_scaler.unscale_(opt)
        torch_scaler.step(opt)
        torch_scaler.update()
        ours.update(finite)
        assert ours.scale == torch_scaler.get_scale(), i
    state = ours.state_dict()
    again = LossScaler(True)
    again.load_state_dict(state)
    assert (again.scale, again.clean) == (ours.scale, ours.clean)


# ----------------------------------------------------------------------------- crops

SIZES = [(300, 280), (500, 375), (256, 400), (1023, 257), (303, 280), (288, 288)]  # 303x280: a centre at x.5


def image(size, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize('size', SIZES, ids=[f'{w}x{h}' for w, h in SIZES])
def test_crops_equal_torchvisions_resize_and_crop(size, tmp_path):
    """VAR's augmentation (utils/data.py): Resize(288, LANCZOS) + RandomCrop(256), the crop drawn with the same
    generator; its validation crop: Resize(288, LANCZOS) + CenterCrop(256); the mirror image of a row is its
    crop flipped."""
    path = tmp_path / 'a.png'
    image(size, sum(size)).save(path)
    seed = crop_seed(0, 3, 17)
    torch.manual_seed(seed)  # RandomCrop draws from the global generator
    expected = np.array(transforms.Compose([transforms.Resize(288, transforms.InterpolationMode.LANCZOS),
                                            transforms.RandomCrop(256)])(Image.open(path).convert('RGB')))
    got, why = load_view(str(path), 'var', seed=seed)
    assert why is None and got.shape == (256, 256, 3)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(load_view(str(path), 'var', mirrored=True, seed=seed)[0], expected[:, ::-1])
    center = transforms.Compose([transforms.Resize(288, transforms.InterpolationMode.LANCZOS), transforms.CenterCrop(256)])
    np.testing.assert_array_equal(load_view(str(path), 'center')[0], np.array(center(Image.open(path).convert('RGB'))))


def test_random_crops_are_fresh_every_epoch_and_a_function_of_seed_epoch_and_row(tmp_path):
    path = tmp_path / 'a.png'
    image((500, 375), 1).save(path)
    crops = {(seed, epoch, row): load_view(str(path), 'var', seed=crop_seed(seed, epoch, row))[0].tobytes()
             for seed in (0, 1) for epoch in (0, 1, 2) for row in (0, 5)}
    assert len(set(crops.values())) == len(crops), 'every (seed, epoch, row) its own crop'
    assert load_view(str(path), 'var', seed=crop_seed(1, 2, 5))[0].tobytes() == crops[1, 2, 5]


# the class-map case: n01440764 and n15075141 alone, ImageNet's first and last classes
TWO_SYNSETS = ('n01440764', 'n15075141')


@pytest.fixture(scope='module')
def var_crop_files(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp('var_crop')
    paths = dict(checkpoints)
    for c, name in enumerate(TWO_SYNSETS):
        (root / 'data' / name).mkdir(parents=True)
        for j, size in enumerate(SIZES[2 * c:2 * c + 2]):
            image(size, 10 * c + j).save(root / 'data' / name / f'{j}.png')
    paths['data'] = str(root / 'data')
    return paths


def var_crop_run(paths, out, *extra):
    return ['--role', 'drafter', '--draft_steps', '4', '--student_ckpt', paths['drafter'], '--vae_ckpt', paths['vae'],
            '--data', paths['data'], '--output_dir', str(out), '--device', 'cpu', '--batch_size', '1', '--total_steps', '3',
            '--workers', '0', '--drop_path', '0.3', *[str(a) for a in extra]]


def test_var_crops_resume_exactly_and_the_class_indices_are_imagenets(var_crop_files, tmp_path):
    """--crop var (the default), images encoded each step: a run stopped after step 0 and resumed (with two
    decoding workers this time, taking steps 1 and 2 in turn) ends with the uninterrupted run's weights; folders n01440764 and n15075141 are
    classes 0 and 999 (written to classes.json)."""
    run_main(finetune_CoDe, var_crop_run(var_crop_files, tmp_path / 'a'))
    run_main(finetune_CoDe, var_crop_run(var_crop_files, tmp_path / 'b', '--max_steps', 1))
    run_main(finetune_CoDe, var_crop_run(var_crop_files, tmp_path / 'b', '--workers', 2))
    a, b = (read_state_dict(str(tmp_path / r / 'weights.pth')) for r in 'ab')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / 'a' / 'classes.json').read_text()) == {'n01440764': 0, 'n15075141': 999}
    assert not (tmp_path / 'a' / 'token_cache').exists(), 'nothing cached: every step crops anew'


# ----------------------------------------------------------------------------- drop path

def test_drop_path_rates_are_vars_linspace():
    for depth in (16, 30):
        rates = loop.drop_path_rates(0.1 * depth / 24, depth)
        assert rates == pytest.approx([i * 0.1 * depth / 24 / (depth - 1) for i in range(depth)])
    keep = loop.drop_path_keep(0, 20000, [0.0, 0.25], 0)
    assert keep.shape == (2, 2, 20000) and torch.all(keep[0] == 1)
    assert keep[1].unique().tolist() == pytest.approx([0.0, 1 / 0.75]) and (keep[1] == 0).float().mean() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(keep, loop.drop_path_keep(0, 20000, [0.0, 0.25], 0)) and not torch.equal(keep, loop.drop_path_keep(1, 20000, [0.0, 0.25], 0))
    assert loop.drop_path_keep(0, 4, [0.0, 0.0], 0) is None


def test_drop_path_acts_in_train_mode_only_on_both_branches(models):
    """Eval mode ignores drop path (the forward sampling uses, tested against the cached sampling step in
    test_finetune); train mode with every branch dropped leaves the embeddings to the head: the logits of
    the same model with no blocks; with one branch dropped, neither the full model nor the one without."""
    vae, drafter, _ = models
    tokens = torch.randint(0, 4096, (2, 680), generator=torch.Generator().manual_seed(0))
    inputs, labels = vae.quantize.teacher_inputs(tokens), torch.tensor([3, 1000])
    none = torch.zeros(2, 2, 2)
    with torch.no_grad():
        full = drafter(labels, inputs, 4)
        assert torch.equal(drafter(labels, inputs, 4, keep=none), full), 'eval mode: no drop path'
        drafter.train()
        try:
            dropped_all = drafter(labels, inputs, 4, keep=none)
            one = torch.ones(2, 2, 2)
            one[1, 0] = 0  # block 1's attention branch, both rows
            dropped_one = drafter(labels, inputs, 4, keep=one)
            assert torch.allclose(drafter(labels, inputs, 4, keep=torch.ones(2, 2, 2)), full, atol=1e-5)
        finally:
            drafter.eval()
        blockless = tiny.apply_rule(VAR(depth=0, embed_dim=128, num_heads=2), tiny.DRAFTER_SALT)
        torch.testing.assert_close(dropped_all, blockless(labels, inputs, 4), rtol=0, atol=1e-5)
        assert not torch.allclose(dropped_one, full, atol=1e-3) and not torch.allclose(dropped_one, dropped_all, atol=1e-3)


# ----------------------------------------------------------------------------- class indices

def test_imagenet_class_indices():
    """The sorted 1,000 synsets; torchvision's Imagenette names ten of them, and each gets the index whose
    torchvision category name is its own."""
    synsets = imagenet_synsets()
    assert len(synsets) == len(set(synsets)) == 1000 and synsets == sorted(synsets)
    names = ResNet50_Weights.IMAGENET1K_V1.meta['categories']
    for wnid, (name, *_) in Imagenette._WNID_TO_CLASS.items():
        assert names[synsets.index(wnid)].lower() == name.lower(), wnid
    assert class_indices(list(TWO_SYNSETS), 1000, '--data') == [0, 999]
    assert class_indices(['a', 'b'], 2, '--data') == [0, 1]
    assert class_indices(['cats', 'dogs'], 1000, '--data', {'cats': 281, 'dogs': 207}, 'm.json') == [281, 207]


def test_the_no_class_rows_get_the_extra_row_not_a_class(models):
    """--cond_drop 1: every row is "no class", the class embedding's extra row 1000 (VAR's num_classes),
    never class 999."""
    vae, drafter, _ = models
    args = argparse.Namespace(batch_size=4, seed=0, cond_drop=1.0)
    labels = np.asarray([999, 0, 5, 999])
    batches = loop.Batches(np.zeros((4, 680), dtype=np.int16), labels, drafter.num_classes, vae, args, 0, 1, torch.device('cpu'))
    got = batches.get(0)[0]
    assert got.tolist() == [1000] * 4 and drafter.class_emb.weight.shape[0] == 1001
    args.cond_drop = 0.0
    assert sorted(batches.get(0)[0].tolist()) == sorted(labels.tolist())


# ----------------------------------------------------------------------------- the token cache

def fake_encode(calls):
    """A stand-in for the VQVAE: each image's 680 tokens from its pixel sums, the images it saw recorded."""
    def encode(vae, images_BHW3):
        calls.append(len(images_BHW3))
        sums = images_BHW3.long().sum(dim=(1, 2, 3))
        return (sums.view(-1, 1) + torch.arange(680)).remainder(4096).to(torch.int16)
    return encode


def test_the_token_cache_encodes_again_only_the_shards_whose_files_changed(models, tmp_path, monkeypatch, capsys):
    """12 images, shards ending after a file whose name hashes to 0 mod 3: one file removed and one replaced
    re-encode only their own shards (plus a neighbour when a shard's last file goes); the tokens of every
    other image are kept as they were."""
    vae = models[0]
    monkeypatch.setattr(data, 'SHARD_MEAN', 3)
    calls = []
    monkeypatch.setattr(data, 'encode', fake_encode(calls))
    root = tmp_path / 'data' / 'n01440764'
    root.mkdir(parents=True)
    for j in range(12):
        image((256, 256), j).save(root / f'{j:02d}.png')
    files = sorted(f'n01440764/{j:02d}.png' for j in range(12))
    first = np.array(data.token_cache(str(tmp_path / 'c'), str(tmp_path / 'data'), files, vae, 'v', 'none', False, batch_size=64, workers=0))
    assert sum(calls) == 12
    ends = [f for f in files if zlib.crc32(f.encode()) % 3 == 0]  # the rule, so the test knows the shards
    shards, cur = [], []
    for f in files:
        cur.append(f)
        if f in ends:
            shards.append(cur)
            cur = []
    shards += [cur] if cur else []
    assert len(shards) >= 3, shards
    removed, replaced = shards[0][0], shards[-1][-1]
    os.remove(tmp_path / 'data' / removed)
    image((256, 256), 99).save(tmp_path / 'data' / replaced)
    calls.clear()
    now = [f for f in files if f != removed]
    second = np.array(data.token_cache(str(tmp_path / 'c'), str(tmp_path / 'data'), now, vae, 'v', 'none', False, batch_size=64, workers=0))
    # the removed file's shard (merged with the next one if it was that shard's end) and the replaced file's shard
    touched = shards[0] + (shards[1] if removed in ends else []) + shards[-1]
    assert sum(calls) == len(set(touched) - {removed}) < 11
    kept = [f for f in now if f not in touched]
    assert kept and all(np.array_equal(second[now.index(f)], first[files.index(f)]) for f in kept)
    fresh = fake_encode([])(None, torch.from_numpy(np.array(image((256, 256), 99)))[None]).numpy()
    np.testing.assert_array_equal(second[now.index(replaced)], fresh[0])
    assert f'{len(shards) - 2 - (removed in ends)} of ' in capsys.readouterr().out


# ----------------------------------------------------------------------------- the settings a rerun keeps

@pytest.fixture(scope='module')
def settings_files(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp('settings')
    paths = dict(checkpoints)
    other_vae = tiny.apply_rule(type(tiny.tiny_vae())(vocab_size=4096, Cvae=32, ch=32), 5)
    paths['other_vae'] = str(root / 'other_vae.pth')
    torch.save(tiny.official_state_dict(other_vae), paths['other_vae'])
    for folder in ('data', 'other_data'):
        for name in TWO_SYNSETS:
            (root / folder / name).mkdir(parents=True)
            image((256, 256), len(folder)).save(root / folder / name / 'a.png')
    (root / 'map.json').write_text(json.dumps({'n01440764': 1, 'n15075141': 2}))
    return root, paths


# every flag of finetune_CoDe.py: a changed value, and whether a rerun with it is refused (it changes the
# weights a run ends with) or free (README: it changes what is logged, how fast, or where this invocation stops)
FLAGS = {
    'role': (['--role', 'all'], 'refused'), 'draft_steps': (['--draft_steps', '5'], 'refused'),
    'student_ckpt': (['--student_ckpt', '{middle}'], 'refused'), 'from_hub': (['--from_hub'], 'free'),
    'teacher_ckpt': (['--teacher_ckpt', 'none'], 'refused'), 'vae_ckpt': (['--vae_ckpt', '{other_vae}'], 'refused'),
    'alpha': (['--alpha', '0.3'], 'refused'), 'kd_temp': (['--kd_temp', '2'], 'refused'),
    'label_smooth': (['--label_smooth', '0.1'], 'refused'), 'cond_drop': (['--cond_drop', '0.2'], 'refused'),
    'drop_path': (['--drop_path', '0.2'], 'refused'), 'data': (['--data', '{root}/other_data'], 'refused'),
    'class_map': (['--class_map', '{root}/map.json'], 'refused'), 'crop': (['--crop', 'center'], 'refused'),
    'hflip': (['--hflip'], 'refused'), 'token_cache': (['--token_cache', '{root}/tc'], 'free'),
    'val_data': (['--val_data', '{root}/data'], 'free'), 'val_every': (['--val_every', '7'], 'free'),
    'workers': (['--workers', '3'], 'free'), 'encode_batch_size': (['--encode_batch_size', '8'], 'free'),
    'blr': (['--blr', '2e-4'], 'refused'), 'sched': (['--sched', 'cos'], 'refused'), 'warmup': (['--warmup', '3'], 'refused'),
    'wp0': (['--wp0', '0.01'], 'refused'), 'wpe': (['--wpe', '0.5'], 'refused'),
    'total_steps': (['--total_steps', '60'], 'refused'), 'max_steps': (['--max_steps', '10'], 'free'),
    'batch_size': (['--batch_size', '4'], 'refused'), 'grad_accum': (['--grad_accum', '2'], 'refused'),
    'wd': (['--wd', '0.1'], 'refused'), 'wd_end': (['--wd_end', '0.0'], 'refused'), 'grad_clip': (['--grad_clip', '1'], 'refused'),
    'seed': (['--seed', '1'], 'refused'), 'output_dir': (['--output_dir', '{root}/elsewhere'], 'free'),
    'save_every': (['--save_every', '5'], 'free'), 'max_skips': (['--max_skips', '3'], 'free'),
    'device': (['--device', 'cuda'], 'refused'), 'dtype': (['--dtype', 'bf16'], 'refused'),
    'fsdp': (['--fsdp'], 'free'), 'grad_ckpt': (['--grad_ckpt'], 'free'),
}


def settings(root, paths, *flags):
    base = ['--role', 'drafter', '--draft_steps', '6', '--student_ckpt', paths['drafter'], '--teacher_ckpt', paths['refiner'],
            '--vae_ckpt', paths['vae'], '--data', str(root / 'data'), '--output_dir', str(root / 'out'), '--total_steps', '50',
            '--batch_size', '2']
    args = finetune_CoDe.parser().parse_args(base + [f.format(root=root, **paths) for f in flags])
    args.device, args.dtype = args.device or 'cpu', args.dtype or 'fp32'  # as finetune_CoDe.main on a CPU
    return loop.prepare(args, torch.device('cpu')).settings


def test_every_flag_is_a_setting_a_rerun_keeps_or_documented_free(settings_files, monkeypatch):
    """The flags come from the parser: a new flag without a decision here fails. The rerun's check compares
    exactly these settings (check_settings: test_finetune's rerun tests). Each file is read once."""
    root, paths = settings_files
    for name in ('load_var', 'load_vae'):
        monkeypatch.setattr(loop, name, functools.lru_cache(getattr(loop, name)))
    flags = [a.dest for a in finetune_CoDe.parser()._actions if a.dest != 'help']
    assert sorted(flags) == sorted(FLAGS), 'every flag needs a decision: refused or free'
    base = settings(root, paths)
    for flag, (change, decision) in FLAGS.items():
        changed = settings(root, paths, *change)
        assert (changed != base) == (decision == 'refused'), (flag, decision)
    free = sorted(f'--{f}' for f, (_, d) in FLAGS.items() if d == 'free')
    text = open(os.path.join(os.path.dirname(finetune_CoDe.__file__), 'README.md')).read()
    assert all(f'`{f}`' in text.split('may change between invocations')[0].split('A rerun with other settings')[-1] for f in free), free


def test_refiner_and_all_distil_from_var_d30_and_the_drafter_from_nothing_by_default(settings_files, monkeypatch):
    """The paper's recipe (czg1225/CoDe issue #6): refiner stages distil VAR-d30's logits; the drafter trains on
    CE alone. Without --teacher_ckpt the hub's var_d30.pth is the teacher (the download is stubbed here)."""
    root, paths = settings_files
    asked = []

    def var_path(local, depth, flag):
        asked.append((flag, depth, local))
        return local or paths['drafter']
    monkeypatch.setattr(loop, 'var_path', var_path)
    for role, teacher in (('refiner', 30), ('all', 30), ('drafter', None)):
        asked.clear()
        args = argparse.Namespace(role=role, student_ckpt=paths['refiner'], teacher_ckpt=None, vae_ckpt=paths['vae'])
        _, got, _ = loop.load_models(args, torch.device('cpu'))
        assert [(f, d) for f, d, local in asked if f == '--teacher_ckpt'] == ([('--teacher_ckpt', teacher)] if teacher else [])
        assert (got is None) == (teacher is None)
    asked.clear()
    loop.load_models(argparse.Namespace(role='refiner', student_ckpt=None, teacher_ckpt='none', vae_ckpt=paths['vae']), 'cpu')
    assert asked == [('--student_ckpt', 16, None)], 'with --from_hub: the hub\'s VAR-d16'
