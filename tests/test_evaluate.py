"""evaluate.py: the evaluator's math against independent computations and hand-worked answers, and
the command end to end with a random-weight Inception saved in torch-fidelity's layout."""
import json
import math
import subprocess
import sys
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from scipy import linalg

import evaluate
from conftest import ROOT, user_error
from utils.errors import UserError
from utils.io import iter_npz_array


def fid_without_sqrtm(x, y):
    """The Frechet distance of two feature sets (rows) without any matrix square root: with Xc, Yc the
    centred features, S1 S2 = Xc^T (Xc Yc^T) Yc / c shares its non-zero eigenvalues with M M^T / c,
    M = Xc Yc^T, c = (n - 1)(m - 1); so tr((S1 S2)^(1/2)) = (sum of M's singular values) / sqrt(c)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    trace_root = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / math.sqrt((len(x) - 1) * (len(y) - 1))
    return np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(xc ** 2) / (len(x) - 1) + np.sum(yc ** 2) / (len(y) - 1) - 2 * trace_root


def unbiased_stats(x):
    xc = x - x.mean(0)
    return x.mean(0), xc.T @ xc / (len(x) - 1)


# ----------------------------------------------------------------------------- FID

def random_stats(rng, dim, n):
    x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) + rng.standard_normal(dim)
    return x.mean(0), np.cov(x, rowvar=False)


def test_fid_equals_an_independent_eigenvalue_computation():
    """tr((S1 S2)^(1/2)) = sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric)."""
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = random_stats(rng, 16, 200), random_stats(rng, 16, 200)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_diagonal_gaussians_is_the_closed_form():
    # N(mu1, diag(a)) and N(mu2, diag(b)): |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(1 + 4 + (1 + 0 + 4), abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    mu, s = random_stats(np.random.default_rng(1), 32, 100)
    assert abs(evaluate.frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)  # 0 up to rounding


def test_fid_retries_a_non_finite_square_root_with_eps():
    """A product with no square root (a nilpotent block) gives non-finite values; the evaluator then
    adds 1e-6 to both diagonals."""
    s1, s2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    with pytest.warns(UserWarning, match='nearly singular'):
        fid = evaluate.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    offset = np.eye(2) * 1e-6
    expected = 2 - 2 * np.trace(linalg.sqrtm((s1 + offset) @ (s2 + offset))).real
    assert math.isfinite(fid) and fid == pytest.approx(expected, rel=1e-6)


def test_fid_of_rank_deficient_covariances_is_exact_and_quiet():
    """Fewer points than dimensions, as on any small set: scipy's "Matrix is singular" warning is
    noise (the value is right), so it must not reach the user."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))  # scipy finds this product singular
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fid = evaluate.frechet_distance(*unbiased_stats(x), *unbiased_stats(y))
    assert fid == pytest.approx(fid_without_sqrtm(x, y), rel=1e-6)


def test_fid_with_a_large_imaginary_square_root_is_an_error():
    """diag(1, 1) times diag(-1, 1) (not a covariance) has the square root diag(i, 1): imaginary part 1 on
    the diagonal, far above the evaluator's 1e-3."""
    with pytest.raises(UserError, match='imaginary component 1 '):
        evaluate.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


# ----------------------------------------------------------------------------- Inception Score

def test_inception_score_of_identical_predictions_is_one():
    probs = np.tile(np.array([[0.5, 0.3, 0.2]], dtype=np.float32), (10, 1))
    assert evaluate.inception_score(probs) == pytest.approx(1.0, abs=1e-6)


def test_inception_score_of_confident_balanced_predictions():
    """C classes, each image puts 1 - e on its own class and e / (C - 1) on each other, classes balanced:
    the marginal is uniform, so IS = exp((1 - e) log((1 - e) C) + e log(e C / (C - 1)))."""
    C, e = 4, 0.1
    probs = np.full((8, C), e / (C - 1), dtype=np.float64)
    probs[np.arange(8), np.arange(8) % C] = 1 - e
    expected = math.exp((1 - e) * math.log((1 - e) * C) + e * math.log(e * C / (C - 1)))
    assert evaluate.inception_score(probs) == pytest.approx(expected, rel=1e-9)


def test_inception_score_averages_over_splits_in_order():
    confident = np.full((4, 4), 0.1 / 3)
    confident[np.arange(4), np.arange(4)] = 0.9
    uniform = np.full((4, 4), 0.25)
    score_confident = evaluate.inception_score(confident)
    assert evaluate.inception_score(np.concatenate([confident, uniform]), split_size=4) == pytest.approx((score_confident + 1) / 2)


# ----------------------------------------------------------------------------- precision and recall

def points(xs):
    return torch.tensor([[x, 0.0] for x in xs])


@pytest.mark.parametrize('batch', [10000, 2])
def test_precision_and_recall_on_points_worked_by_hand(batch):
    """Reference 0, 1, 2, 3, 4 on a line: squared radii to the 3rd neighbour 9, 4, 4, 4, 9. Samples
    10, 11, 12, 13, 2.5: radii 9, 4, 4, 9 and 9.5^2 for 2.5. Only 2.5 falls in a reference ball
    (0.5^2 <= 4 around 2): precision 1/5. 2.5's ball holds every reference point: recall 1."""
    ref, sample = points([0, 1, 2, 3, 4]), points([10, 11, 12, 13, 2.5])
    assert evaluate.manifold_radii(ref, batch=batch).tolist() == [9, 4, 4, 4, 9]
    assert evaluate.manifold_radii(sample, batch=batch).tolist() == [9, 4, 4, 9, 90.25]
    assert evaluate.precision_recall(ref, sample, batch=batch) == pytest.approx((0.2, 1.0))


def test_identical_sets_have_full_precision_and_recall():
    feats = torch.randn(50, 16)
    assert evaluate.precision_recall(feats, feats, batch=7) == (1.0, 1.0)


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope='module')
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 layout with random weights scaled so features still vary."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    with mock.patch.object(tf_inception, 'load_state_dict_from_url', lambda *a, **k: None), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, *a, **k: None):
        net = tf_inception.FeatureExtractorInceptionV3('random', ['2048'])
    g = torch.Generator().manual_seed(0)
    state = net.state_dict()
    with torch.no_grad():
        for name, p in state.items():
            if name.endswith('conv.weight'):
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2 / p[0].numel()))
            elif name == 'fc.weight':
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp('inception') / 'inception-random.pth'
    torch.save(state, path)
    return str(path)


def test_end_to_end(inception_file, tmp_path):
    """The reference holds images (for precision and recall) and stored statistics (for FID and sFID),
    here the statistics of the sample batch itself: FID and sFID must come out 0."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (12, 48, 48, 3), dtype=np.uint8)
    b = (rng.integers(0, 256, (12, 48, 48, 3)) // 2).astype(np.uint8)
    inception = evaluate.Inception(inception_file, torch.device('cpu'))
    pool, _, spatial = inception(b)
    ref_images = np.concatenate([b[:8], a[:4]])
    np.savez(tmp_path / 'ref.npz', arr_0=ref_images, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    np.savez(tmp_path / 'sample.npz', arr_0=b, labels=np.arange(12))
    r = subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), str(tmp_path / 'ref.npz'), str(tmp_path / 'sample.npz'),
                        '--inception_weights', inception_file, '--device', 'cpu', '--batch_size', '5'],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / 'sample.metrics.json').read_text())
    for name, key in (('Inception Score', 'inception_score'), ('FID', 'fid'), ('sFID', 'sfid'), ('Precision', 'precision'), ('Recall', 'recall')):
        assert f'{name}: {metrics[key]}' in r.stdout
    assert abs(metrics['fid']) < 1e-3 and abs(metrics['sfid']) < 1e-3
    assert 8 / 12 <= metrics['precision'] <= 1 and 8 / 12 <= metrics['recall'] <= 1  # 8 images are in both sets
    assert metrics['inception_score'] >= 1 and metrics['num_samples'] == 12



def test_files_that_are_not_npz_archives(tmp_path, capsys):
    """Any file, a truncated archive, an archive whose statistics fail their CRC: one line, exit 2."""
    good = tmp_path / 'good.npz'
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    (tmp_path / 'README.md').write_text('# not an archive\n')
    (tmp_path / 'truncated.npz').write_bytes(good.read_bytes()[:700])
    np.savez(tmp_path / 'stats.npz', mu=np.zeros(3), sigma=np.full((3, 3), 7.0), mu_s=np.zeros(2), sigma_s=np.eye(2))
    data = bytearray((tmp_path / 'stats.npz').read_bytes())
    at = data.index(np.full((3, 3), 7.0).tobytes())
    data[at + 5] ^= 0xFF  # inside sigma's values: only its CRC tells
    (tmp_path / 'crc.npz').write_bytes(bytes(data))
    weights = ['--inception_weights', str(good)]
    for bad in ('README.md', 'truncated.npz'):
        assert 'cannot read' in user_error(evaluate, [str(tmp_path / bad), str(good)] + weights, capsys), bad
        assert 'cannot read' in user_error(evaluate, [str(good), str(tmp_path / bad)] + weights, capsys), bad
    assert 'cannot read the statistics' in user_error(evaluate, [str(tmp_path / 'crc.npz'), str(good)] + weights, capsys)


def test_device_errors_name_the_device_not_the_weights(tmp_path, capsys, monkeypatch):
    good = tmp_path / 'good.npz'
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    args = [str(good), str(good), '--inception_weights', str(good), '--device']
    assert 'no CUDA GPU' in user_error(evaluate, args + ['cuda'], capsys)
    assert 'unknown device' in user_error(evaluate, args + ['nonsense'], capsys)
    assert 'only cuda and cpu' in user_error(evaluate, args + ['meta'], capsys)


def test_device_flag_says_what_it_takes_and_its_default():
    text = ' '.join(evaluate.parser().format_help().split())
    start = text.rindex('--device DEVICE')  # its entry in the options, not the usage line
    device = text[start:text.index('--inception_weights INCEPTION_WEIGHTS', start)]
    default = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert 'cpu' in device and f'default: cuda if available, here {default}' in device


def test_npz_rows_come_out_writable(tmp_path):
    """torch.from_numpy warns on every read-only batch; the rows must be writable (and right)."""
    images = np.arange(24, dtype=np.uint8).reshape(4, 2, 3)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / 'a.npz', arr_0=images)
        rows = list(iter_npz_array(str(tmp_path / 'a.npz'), 'arr_0', 3))
        assert [r.flags.writeable for r in rows] == [True, True] and np.array_equal(np.concatenate(rows), images)


def test_bad_input(tmp_path, capsys):
    good = tmp_path / 'good.npz'
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    cases = {
        'no_images.npz': (dict(labels=np.arange(3)), 'has no arr_0', 'sample'),
        'float.npz': (dict(arr_0=np.zeros((4, 8, 8, 3), dtype=np.float32)), 'must be uint8 N x H x W x 3', 'sample'),
        'gray.npz': (dict(arr_0=np.zeros((4, 8, 8), dtype=np.uint8)), 'must be uint8 N x H x W x 3', 'sample'),
        'one.npz': (dict(arr_0=np.zeros((1, 8, 8, 3), dtype=np.uint8)), 'at least 2 are needed', 'sample'),
        'empty_ref.npz': (dict(labels=np.arange(3)), 'holds neither images (arr_0) nor statistics', 'ref'),
        'half_stats.npz': (dict(mu=np.zeros(3)), 'holds mu but not sigma, mu_s, sigma_s', 'ref'),
    }
    for name, (arrays, message, role) in cases.items():
        np.savez(tmp_path / name, **arrays)
        args = [str(good), str(tmp_path / name)] if role == 'sample' else [str(tmp_path / name), str(good)]
        assert message in user_error(evaluate, args + ['--inception_weights', str(good)], capsys), name
    assert 'no such file' in user_error(evaluate, [str(good), str(tmp_path / 'missing.npz')], capsys)


def test_failed_inception_download_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', mock.Mock(side_effect=OSError('network unreachable')))
    with pytest.raises(UserError) as e:
        evaluate.inception_weights_path(None)
    message = str(e.value)
    assert 'weights-inception-2015-12-05-6726825d.pth' in message and str(tmp_path) in message and '--inception_weights' in message
