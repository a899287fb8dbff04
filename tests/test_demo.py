"""demo_CoDe.py as its users meet it: served on a free port of 127.0.0.1 on the tiny checkpoints, driven
over HTTP by gradio_client (as a script against the page's API would), and once in headless Chromium.
Its images are checked against the scripts' own outputs (infer_CoDe.py, infer_original.py,
inpaint_CoDe.py run through their main) and against the reference's tokens (tests/fixtures)."""
import os
import shutil
import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import demo_CoDe
import infer_CoDe
import infer_original
import inpaint_CoDe
from conftest import ROOT, run_main, user_error
from utils.cli import CODE_TEMP
from utils.errors import UserError

# .ci/run sets CODE_VAR_CI=1: there a missing gradio or Chromium fails the suite instead of skipping
IN_CI = os.environ.get('CODE_VAR_CI') == '1'


def require(ok, why, module=False):
    if not ok:
        if IN_CI:
            pytest.fail(f'{why} (CODE_VAR_CI=1: .ci/run should have installed it)', pytrace=False)
        pytest.skip(why, allow_module_level=module)


try:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
except ImportError:
    require(False, 'gradio is not installed (pip install -r requirements.txt)', module=True)

GOLDEN_LABELS = [992, 483, 970, 609]
# Gradio 6's queue calls pandas options that pandas 3 deprecates: its warnings, not this code's
pytestmark = pytest.mark.filterwarnings('ignore:::gradio.queueing')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def local(checkpoints):
    return ['--drafter_ckpt', checkpoints['drafter'], '--refiner_ckpt', checkpoints['refiner'], '--vae_ckpt', checkpoints['vae']]


@pytest.fixture(scope='module')
def app(checkpoints, tmp_path_factory):
    port, checkout = free_port(), sorted(os.listdir(ROOT))
    flags = local(checkpoints) + ['--var_ckpt', checkpoints['middle'], '--port', str(port)]  # VAR: a model of its own
    page = demo_CoDe.launch(demo_CoDe.parser().parse_args(flags), block=False)
    url = f'http://127.0.0.1:{port}/'
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp('downloads')))
    yield SimpleNamespace(url=url, port=port, client=client)
    page.close()
    assert sorted(os.listdir(ROOT)) == checkout, 'the demo wrote into the checkout'


def generate(app, classes, steps=8, compare=False, seed=42, cfg=4.0, top_k='600', top_p=0.95, temp=CODE_TEMP, more_smooth=False):
    """The Generate button: (CoDe, VAR), each a namespace of gallery, stats, png, npz."""
    out = app.client.predict(classes, steps, compare, seed, cfg, top_k, top_p, temp, more_smooth, api_name='/generate')
    return [SimpleNamespace(gallery=g, stats=s, png=p, npz=n) for g, s, p, n in (out[:4], out[4:])]


def script_npz(script, args, tmp_path, name):
    npz, png = tmp_path / f'{name}.npz', tmp_path / f'{name}.png'
    run_main(script, args + ['--repeats', '1', '--output', str(png), '--save_npz', str(npz)])
    return np.load(npz), np.asarray(Image.open(png))


def assert_same(page, script, script_grid):
    """The page's npz is the script's, array for array; its grid PNG and gallery show those images."""
    saved = np.load(page.npz)
    assert sorted(saved.files) == sorted(script.files)
    for key in script.files:
        assert np.array_equal(saved[key], script[key]), key
    assert np.array_equal(np.asarray(Image.open(page.png)), script_grid)
    for item, image, name in zip(page.gallery, script['images'], script['class_names']):
        assert np.array_equal(np.asarray(Image.open(item['image']).convert('RGB')), image)
        assert item['caption'].endswith(f' {name}')


def test_generate_gives_infer_codes_images(app, checkpoints, golden, tmp_path):
    """Golden case 10: the reference infer_CoDe.py's defaults on four labels, chosen as a list entry, a
    typed name and typed numbers."""
    code, var = generate(app, ['992 agaric', 'castle', '970', '609'])
    script, grid = script_npz(infer_CoDe, local(checkpoints) + ['--class_labels', ','.join(map(str, GOLDEN_LABELS))], tmp_path, 'code')
    assert_same(code, script, grid)
    assert np.array_equal(script['tokens'], golden[1]['case10_tokens'])
    assert [item['caption'] for item in code.gallery] == ['992 agaric', '483 castle', '970 alp', '609 jeep']
    assert 'CoDe: VAR-d2 drafts 8 scales, VAR-d1 refines' in code.stats
    assert 'sampling' in code.stats and 'VQVAE decode' in code.stats and 'peak memory' in code.stats
    assert not var.gallery and var.npz is None and not var.stats


def test_compare_returns_code_and_var_from_the_same_seed(app, checkpoints, tmp_path):
    """VAR is --var_ckpt's model over all 10 scales: at infer_original.py's settings it is that script's output
    with those weights; CoDe at N=3 is infer_CoDe.py's --draft_steps 3."""
    code, var = generate(app, ['0 tench', '999 toilet tissue'], steps=3, compare=True, seed=7, top_k='900', temp='1.0')
    flags = ['--class_labels', '0,999', '--seed', '7', '--vae_ckpt', checkpoints['vae']]
    var_script, var_grid = script_npz(infer_original, flags + ['--var_ckpt', checkpoints['middle']], tmp_path, 'var')
    code_script, code_grid = script_npz(infer_CoDe, flags + ['--drafter_ckpt', checkpoints['drafter'], '--refiner_ckpt',
                                                             checkpoints['refiner'], '--draft_steps', '3', '--top_k', '900',
                                                             '--temp', '1.0'], tmp_path, 'code')
    assert_same(var, var_script, var_grid)
    assert_same(code, code_script, code_grid)
    assert not np.array_equal(var_script['tokens'], code_script['tokens'])
    assert 'VAR-d1 alone' in var.stats and 'CoDe: VAR-d2 drafts 3 scales' in code.stats
    assert 'x the speed of VAR' in code.stats and 'peak memory' in var.stats


def test_the_var_compared_with_is_the_official_one_beside_the_hubs_fine_tuned_pair(monkeypatch):
    """The hub's fine-tuned drafter is trained for the first scales only: alone it is not VAR-d30."""
    from utils import checkpoints as ck
    monkeypatch.setattr(ck, 'download', lambda repo, name, flag: f'{repo}/{name}')
    path = lambda *flags: demo_CoDe.baseline_path(demo_CoDe.parser().parse_args(list(flags)))
    assert path() == 'FoundationVision/var/var_d30.pth'
    assert path('--training_free') is None and path('--drafter_ckpt', 'a.pth', '--refiner_ckpt', 'b.pth') is None
    assert path('--schedule', 'd30:6,d16') is None
    assert path('--training_free', '--var_ckpt', 'v.pth') == 'v.pth'


@pytest.fixture(scope='module')
def edit_inputs(tmp_path_factory):
    """A 768x512 picture with an alpha channel (which the script's reading drops), a brush layer painted
    over part of it (opaque there, transparent elsewhere), and the same region as a white-on-black mask
    file. Both come in as the images do: halved to 384x256, then the centre 256 columns (64 cut off each
    side), so the box x 200-456, y 128-384 becomes x 36-164, y 64-192."""
    folder = tmp_path_factory.mktemp('edit')
    rng = np.random.default_rng(1)
    picture = np.kron(rng.integers(0, 256, (16, 24, 4)), np.ones((32, 32, 1))).astype(np.uint8)
    painted = np.zeros((512, 768), dtype=bool)
    painted[128:384, 200:456] = True
    layer = np.zeros((512, 768, 4), dtype=np.uint8)
    layer[painted] = (255, 0, 255, 255)
    paths = SimpleNamespace(image=folder / 'picture.png', layer=folder / 'layer.png', mask=folder / 'mask.png',
                            broken=folder / 'broken.png', blank=folder / 'blank.png')
    Image.fromarray(picture, 'RGBA').save(paths.image)
    Image.fromarray(layer, 'RGBA').save(paths.layer)
    Image.fromarray(painted.astype(np.uint8) * 255).save(paths.mask)
    Image.fromarray(np.zeros((512, 768, 4), dtype=np.uint8), 'RGBA').save(paths.blank)
    paths.broken.write_bytes(b'not an image')
    paths.region = np.zeros((256, 256), dtype=bool)
    paths.region[64:192, 36:164] = True
    return paths


def edit(app, image, layer, cls='207', invert=False, steps=6, seed=5):
    editor = {'background': handle_file(str(image)), 'layers': [handle_file(str(layer))] if layer else [], 'composite': None}
    return app.client.predict(editor, cls, invert, steps, seed, 4.0, '600', 0.95, CODE_TEMP, False, api_name='/edit')


@pytest.mark.parametrize('invert', [False, True], ids=['inpaint', 'outpaint'])
def test_edit_gives_inpaint_codes_result(app, checkpoints, edit_inputs, tmp_path, invert):
    shown_input, shown_masked, shown_result, stats, png, npz = edit(app, edit_inputs.image, edit_inputs.layer, invert=invert)
    out, saved = tmp_path / 'grid.png', tmp_path / 'script.npz'
    run_main(inpaint_CoDe, local(checkpoints) + ['--image', str(edit_inputs.image), '--mask', str(edit_inputs.mask), '--class_labels', '207',
                                                 '--draft_steps', '6', '--seed', '5', '--output', str(out), '--save_npz', str(saved)]
             + (['--invert'] if invert else []))
    script, page = np.load(saved), np.load(npz)
    for key in script.files:
        assert np.array_equal(page[key], script[key]), key
    grid = np.asarray(Image.open(out))
    assert np.array_equal(np.asarray(Image.open(png)), grid)
    for k, shown in enumerate((shown_input, shown_masked, shown_result)):  # the script's grid: input, masked input, result
        assert np.array_equal(np.asarray(Image.open(shown).convert('RGB')), grid[:, 256 * k:256 * (k + 1)]), k
    assert np.array_equal((grid[:, 256:512] == 128).all(-1), edit_inputs.region != invert)  # greyed out: what is regenerated
    assert ('outpainted around' if invert else 'regenerated') in stats and '207 golden retriever' in stats


def test_bad_input_is_a_message_in_the_page_and_the_app_keeps_serving(app, checkpoints, edit_inputs, capfd):
    """The message is the line the scripts print, and no traceback reaches the page or the server's log."""
    bad = [
        (lambda: generate(app, ['not a class']), "unknown ImageNet class name 'not a class'"),
        (lambda: generate(app, ['dog']), "class name 'dog' is ambiguous"),
        (lambda: generate(app, ['1000']), "classes: class 1000 is outside the model's classes 0-999"),
        (lambda: generate(app, []), 'choose at least one class'),
        (lambda: generate(app, ['1'], top_k='600,600'), '--top_k takes 1 or 10 comma-separated values, got 2'),
        (lambda: generate(app, ['1'], top_k='many'), "--top_k takes comma-separated ints, got 'many'"),
        (lambda: generate(app, ['1'], top_p=1.5), '--top_p must be in [0, 1], got 1.5'),
        (lambda: generate(app, ['1'], cfg=-1), '--cfg must be >= 0, got -1.0'),
        (lambda: generate(app, ['1'], temp='0'), '--temp must be > 0'),
        (lambda: edit(app, edit_inputs.broken, edit_inputs.layer), 'cannot read image broken.png (UnidentifiedImageError'),
        (lambda: edit(app, edit_inputs.image, None), 'the region to regenerate is empty'),
        (lambda: edit(app, edit_inputs.image, edit_inputs.blank), 'the region to regenerate is empty'),
        (lambda: edit(app, edit_inputs.image, edit_inputs.blank, invert=True), 'the region to regenerate is the whole image'),
        (lambda: edit(app, edit_inputs.image, edit_inputs.layer, cls='no such thing'), "unknown ImageNet class name 'no such thing'"),
    ]
    for request, message in bad:
        with pytest.raises(AppError) as e:
            request()
        assert message in str(e.value) and 'Traceback' not in str(e.value), (message, str(e.value))
    assert 'Traceback' not in capfd.readouterr().err
    line = user_error(infer_CoDe, local(checkpoints) + ['--top_p', '1.5'], capfd)  # the script's check, word for word
    assert line.rstrip().endswith('--top_p must be in [0, 1], got 1.5')
    code, _ = generate(app, ['3'])  # and the next request works
    assert len(code.gallery) == 1 and np.load(code.npz)['labels'].tolist() == [3]


def test_requests_take_the_models_one_at_a_time_in_order(app):
    """A long request, then a short one sent while the first is sampling: the short one waits for its turn."""
    from gradio_client.utils import Status
    finished = []

    def submit(classes, compare, name):
        return app.client.submit(classes, 8, compare, 1, 4.0, '600', 0.95, CODE_TEMP, False, api_name='/generate',
                                 result_callbacks=[lambda *_: finished.append(name)])
    long = submit(['1', '2'], True, 'long')
    while long.status().code != Status.PROCESSING:
        time.sleep(0.01)
    short = submit(['3'], False, 'short')
    long.result(), short.result()
    assert finished == ['long', 'short']


def test_a_busy_port_or_a_bad_flag_is_one_line_before_any_model_loads(app, checkpoints, capsys):
    assert f'cannot serve on 127.0.0.1:{app.port}' in user_error(demo_CoDe, local(checkpoints) + ['--port', str(app.port)], capsys)
    assert '--top_p must be in [0, 1]' in user_error(demo_CoDe, ['--top_p', '2', '--port', str(free_port())], capsys)
    # and what needs the models is checked once they are loaded, before the page is served
    with pytest.raises(UserError, match='--top_k 5000 exceeds the vocabulary size 4096'):
        demo_CoDe.Demo(demo_CoDe.parser().parse_args(local(checkpoints) + ['--top_k', '5000']))


CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMIUM_FLAGS = ['--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync']  # no calls out of a closed network


def test_in_a_browser_pick_a_class_click_generate_and_the_images_appear(app, tmp_path):
    """Headless Chromium (Debian's package; Playwright starts it with a fresh profile). DEMO_SCREENSHOT=PATH
    also saves the page there (the README's docs/demo.png:
    DEMO_SCREENSHOT=docs/demo.png python -m pytest -q tests/test_demo.py -k browser)."""
    require(os.path.exists(CHROMIUM), 'Chromium is not installed (apt-get install chromium)')
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, 'playwright is not installed (pip install -r requirements.txt)')
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 900})
            page.goto(app.url)
            classes = page.locator('#classes input')
            classes.click()
            classes.fill('tabby')
            page.get_by_role('option', name='281 tabby').click()
            page.keyboard.press('Escape')  # close the list
            page.get_by_role('button', name='Generate', exact=True).click()
            for gallery in ('#code-gallery', '#var-gallery'):
                page.locator(f'{gallery} img').nth(1).wait_for(timeout=60_000)  # the preselected class and the tabby
            assert page.locator('#code-gallery img').count() == 2 and page.locator('#var-gallery img').count() == 2
            assert '281 tabby' in page.locator('#code-gallery').inner_text()
            assert 'VQVAE decode' in page.locator('#code-stats').inner_text() and 'x the speed of VAR' in page.locator('#code-stats').inner_text()
            page.screenshot(path=str(tmp_path / 'demo.png'))
            if os.environ.get('DEMO_SCREENSHOT'):  # 256 colours keep the README's picture small
                Image.open(tmp_path / 'demo.png').convert('RGB').quantize(256).save(os.environ['DEMO_SCREENSHOT'], optimize=True)
        finally:
            browser.close()
