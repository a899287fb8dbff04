"""Zero-shot inpainting: the encoder and every inpainting case reproduce the reference
(tests/fixtures/expected_inpaint.npz: VQVAE.img_to_idxBl, autoregressive_infer_inpaint, and CoDe's
autoregressive_inpaint_draft + autoregressive_inpaint_refine on the tiny weights)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import inpaint_CoDe
from conftest import FIXTURES, run_main, user_error
from models import Stage, code_schedule, generate
from models.sampling import known_region
from utils.io import to_uint8

CASES = json.loads((FIXTURES / 'cases_inpaint.json').read_text())
EXPECTED = np.load(FIXTURES / 'expected_inpaint.npz')


def model_input():
    return torch.from_numpy(EXPECTED['input_image']).permute(0, 3, 1, 2).float() / 255 * 2 - 1


def box_region(box, B=2):
    x0, y0, x1, y1 = box
    region = torch.zeros(B, 1, 256, 256)
    region[:, :, y0:y1, x0:x1] = 1
    return region


def test_encoder_reproduces_the_reference(models):
    vae = models[0]
    with torch.inference_mode():
        tokens, f_hats = vae.encode(model_input())
        reconstruction = to_uint8(vae.decode(f_hats[-1]))
    assert np.array_equal(torch.cat(tokens, 1).numpy(), EXPECTED['encode_tokens'])
    torch.testing.assert_close(f_hats[-1], torch.from_numpy(EXPECTED['encode_fhat_last']), rtol=1e-5, atol=1e-5)
    assert np.abs(reconstruction.astype(int) - EXPECTED['reconstruction'].astype(int)).max() <= 1


@pytest.mark.parametrize('i', range(len(CASES)))
def test_inpainting_case(i, models):
    case = CASES[i]
    vae, drafter, refiner = models
    schedule = [Stage(drafter, 10)] if case['mode'] == 'original' else code_schedule(drafter, refiner, case['N'])
    with torch.inference_mode():
        known = known_region(vae, model_input(), box_region(case['box']))
        tokens, f_hat = generate(schedule, vae, torch.tensor(case['labels']), seed=case['seed'], cfg=case['cfg'], top_k=case['top_k'],
                                 top_p=case['top_p'], temp=case.get('temp', 1.0), known=known)
        images = to_uint8(vae.decode(f_hat))
    mismatch = np.argwhere(tokens.numpy() != EXPECTED[f'case{i}_tokens'])
    assert len(mismatch) == 0, f'{len(mismatch)} tokens differ, first at {mismatch[0].tolist()}'
    assert np.abs(images.astype(int) - EXPECTED[f'case{i}_image'].astype(int)).max() <= 1


def test_outpainting_keeps_the_centre_features_and_regenerates_the_rest(models):
    """--invert: inside the box the final features are exactly the input's; around it they are new.
    (Pixels near the box differ a little either way: the decoder's convolutions and attention mix.)"""
    vae, drafter, refiner = models
    with torch.inference_mode():
        x = model_input()
        _, f_hats = vae.encode(x)
        f_known, keep = known_region(vae, x, 1 - box_region([64, 64, 192, 192]))
        _, f_hat = generate(code_schedule(drafter, refiner, 8), vae, torch.tensor([1, 2]), seed=0, cfg=1.5, top_k=600,
                            top_p=0.96, known=(f_known, keep))
    assert keep[:, 0, 4:12, 4:12].all() and keep.sum() == 2 * 64
    keep = keep.expand_as(f_hat)
    assert torch.equal(f_hat[keep], f_hats[-1][keep])
    assert (f_hat[~keep] != f_hats[-1][~keep]).float().mean() > 0.99


def test_the_region_reaches_16x16_by_nearest_sampling(models):
    """As the reference: cell (i, j) of the 16x16 grid takes pixel (16 i, 16 j) of the mask, so a box
    from 40 to 200 regenerates columns 3..12 (48..192), and rows 24 to 130 regenerate rows 2..8."""
    vae = models[0]
    region = torch.zeros(1, 1, 256, 256)
    region[..., 24:130, 40:200] = 1
    with torch.inference_mode():
        _, keep = known_region(vae, torch.zeros(1, 3, 256, 256), region)
    expected = torch.ones(16, 16, dtype=torch.bool)
    expected[2:9, 3:13] = False
    assert torch.equal(keep[0, 0], expected)


def test_images_are_resized_bicubic_then_centre_cropped(tmp_path):
    """A 300x200 image: shorter side to 256 (384x256, PIL's bicubic), then the centred 256 columns."""
    from utils.io import load_image
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    img.save(tmp_path / 'wide.png')
    loaded, size = load_image(str(tmp_path / 'wide.png'))
    expected = np.asarray(img.resize((384, 256), Image.BICUBIC))[:, 64:320]
    assert size == (300, 200) and np.array_equal(loaded, expected)


@pytest.fixture(scope='module')
def pngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('images')
    paths = []
    for k, img in enumerate(EXPECTED['input_image']):
        paths.append(str(folder / f'input{k}.png'))
        Image.fromarray(img).save(paths[-1])
    return paths


def local(checkpoints):
    return ['--drafter_ckpt', checkpoints['drafter'], '--refiner_ckpt', checkpoints['refiner'], '--vae_ckpt', checkpoints['vae']]


def test_inpaint_script_reproduces_a_reference_case(checkpoints, pngs, tmp_path):
    case = CASES[1]  # CoDe N=8, the infer_CoDe.py defaults
    out, npz = tmp_path / 'grid.png', tmp_path / 'out.npz'
    run_main(inpaint_CoDe, [*local(checkpoints), '--image', *pngs, '--class_labels', ','.join(map(str, case['labels'])),
                            '--box', ','.join(map(str, case['box'])), '--seed', str(case['seed']), '--draft_steps', str(case['N']),
                            '--output', str(out), '--save_npz', str(npz)])
    saved = np.load(npz)
    assert np.array_equal(saved['tokens'], EXPECTED['case1_tokens'])
    assert np.abs(saved['images'].astype(int) - EXPECTED['case1_image'].astype(int)).max() <= 1
    grid = np.asarray(Image.open(out))
    assert grid.shape == (512, 768, 3)
    assert np.array_equal(grid[256:, :256], EXPECTED['input_image'][1])
    assert (grid[256 + 100, 256 + 100] == 128).all() and np.array_equal(grid[256:, 512:], saved['images'][1])


def test_a_mask_file_and_a_schedule_equal_the_box_and_the_two_model_flags(checkpoints, pngs, tmp_path):
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[64:192, 64:192] = 255
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    results = []
    schedule = ['--schedule', f'{checkpoints["drafter"]}:6,{checkpoints["refiner"]}', '--vae_ckpt', checkpoints['vae']]
    for models, region in ((local(checkpoints) + ['--draft_steps', '6'], ['--box', '64,64,192,192']),
                           (local(checkpoints) + ['--draft_steps', '6'], ['--mask', str(tmp_path / 'mask.png')]),
                           (schedule, ['--box', '64,64,192,192'])):  # the same two models, named as a schedule
        npz = tmp_path / f'{len(results)}.npz'
        run_main(inpaint_CoDe, models + ['--image', pngs[0], '--class_labels', '207', '--output', str(tmp_path / 'g.png'),
                                         '--save_npz', str(npz)] + region)
        results.append(np.load(npz)['tokens'])
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])



def bad_cases(tmp_path, pngs):
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    Image.fromarray(np.zeros((100, 80), dtype=np.uint8)).save(tmp_path / 'small_mask.png')
    return [
        (['--image', str(tmp_path / 'broken.png'), '--class_labels', '1', '--box', '0,0,8,8'], 'cannot read image'),
        (['--image', '/no/such.png', '--class_labels', '1', '--box', '0,0,8,8'], 'cannot read image /no/such.png'),
        (['--image', *pngs, '--class_labels', '1', '--box', '0,0,8,8'], 'one class per image: 2 image(s), 1 label(s)'),
        (['--image', pngs[0], '--class_labels', '1', '--box', '0,0,300,8'], 'leaves the 256x256 frame'),
        (['--image', pngs[0], '--class_labels', '1', '--box', '10,10,10,20'], 'is empty'),
        (['--image', pngs[0], '--class_labels', '1'], 'exactly one of --box and --mask'),
        (['--image', pngs[0], '--class_labels', '1', '--mask', str(tmp_path / 'small_mask.png')], 'must be 256x256'),
        (['--image', pngs[0], '--class_labels', '1', '--box', '0,0,256,256'], 'the whole image'),
        (['--image', pngs[0], '--class_labels', '1', '--box', '0,0,256,256', '--invert'], 'is empty'),
        (['--image', pngs[0], '--class_labels', '1000', '--box', '0,0,8,8'], 'class 1000 is outside'),
    ]


def test_bad_input_is_one_line_and_exit_2(checkpoints, pngs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, message in bad_cases(tmp_path, pngs):
        assert message in user_error(inpaint_CoDe, local(checkpoints) + args, capsys), args
