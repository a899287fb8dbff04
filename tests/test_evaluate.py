"""evaluate.py: the evaluator's math against independent computations and hand-worked answers, and
the command end to end with a random-weight Inception saved in torch-fidelity's layout, its metrics
recomputed here with numpy from torch-fidelity's network read directly."""
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
from conftest import ROOT, run_main, user_error
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


def test_statistics_are_the_mean_and_the_unbiased_covariance():
    # columns (0, 2, 4) and (1, 1, 4): means 2, 2; variances 8/2 and 6/2; covariance (2 + 0 + 4)/2 = 3, all over N - 1 = 2
    mu, sigma = evaluate.statistics(np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]]))
    assert mu.tolist() == [2, 2] and sigma.tolist() == [[4, 3], [3, 3]]


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


def test_inception_score_splits_every_5000_images():
    """The evaluator's splits hold 5,000 images. Images 0-2499 say class 0 and 2500-4999 class 1, each
    with probability 1 - e: in that split the marginal is (1/2, 1/2), so its score is
    exp((1 - e) log(2 (1 - e)) + e log(2 e)); images 5000-9999 all say class 0, a split scoring 1.
    A split of any other size has other marginals (500: every split is one class and scores 1)."""
    e = 0.1
    class0, class1 = [1 - e, e], [e, 1 - e]
    probs = np.array([class0] * 2500 + [class1] * 2500 + [class0] * 5000)
    first = math.exp((1 - e) * math.log(2 * (1 - e)) + e * math.log(2 * e))
    assert evaluate.inception_score(probs) == pytest.approx((first + 1) / 2, rel=1e-9)


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


def test_precision_uses_float16_distances_worked_by_hand():
    """The evaluator casts features to float16 before the distances. 7 + 2^-10 is 7 in float16 (its
    spacing there is 2^-8): 3 from the reference point 4, whose squared radius is 9, so it is inside
    (9 <= 9), while in float32 it is outside (9 + 6 * 2^-10 > 9). Samples 7, 20, 21, 22, 23 (float16):
    squared radii 15^2, 9, 4, 4, 9 (15 - 2^-10 squared in float32); 7's ball holds every reference
    point: recall 1; precision 1/5 (0 in float32). All float16 values here are small integers, exact."""
    ref, sample = points([0, 1, 2, 3, 4]), points([7 + 2 ** -10, 20, 21, 22, 23])
    assert evaluate.manifold_radii(sample).tolist() == [225, 9, 4, 4, 9]
    assert evaluate.precision_recall(ref, sample) == (0.2, 1.0)


# ----------------------------------------------------------------------------- the command, end to end

@pytest.fixture(scope='module')
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 layout with random weights scaled so features still vary, and a
    classifier whose bias is large enough to change the Inception Score if it were added."""
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
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name == 'fc.bias':
                p.copy_(torch.randn(p.shape, generator=g) * 5)
    path = tmp_path_factory.mktemp('inception') / 'inception-random.pth'
    torch.save(state, path)
    return str(path)


def gray(level):
    return np.full((16, 16, 3), level, dtype=np.uint8)


# Two sets that differ (the net resizes everything to 299, so 16 x 16 will do). On this fixture's
# network uniform gray images lie on a line in pool_3 space, far apart compared with float16's rounding;
# these were picked so that precision and recall are neither 0 nor 1 and no distance is within float16
# rounding of the radius it is compared with (test_end_to_end checks both).
BLOCKS = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3)).astype(np.uint8).repeat(4, 1).repeat(4, 2)
REF_IMAGES = np.stack([gray(v) for v in (0, 32, 192, 224, 240, 255)] + [BLOCKS[1], BLOCKS[3]])
SAMPLE_IMAGES = np.stack([gray(v) for v in (112, 64, 128, 160, 16, 176)])


def torch_fidelity_features(weights, images):
    """pool_3, the logits without the fc bias and mixed_6/conv[..., :7] flattened (height, width,
    channel), in float64, read from torch-fidelity's network itself: its 2048 output, a hook of our own
    on Mixed_6d.branch1x1 (TF's mixed_6 is the 4th 17 x 17 block, mixed_6/conv its 1x1 branch) and
    its fc weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    net = FeatureExtractorInceptionV3('independent', ['2048'], feature_extractor_weights_path=weights)
    mixed_6 = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: mixed_6.append(out))
    with torch.no_grad():
        pool = net(torch.from_numpy(images).permute(0, 3, 1, 2))[0].double().numpy()
    spatial = mixed_6[0].double().numpy()
    assert spatial.shape == (len(images), 192, 17, 17)
    spatial = spatial[:, :7].transpose(0, 2, 3, 1).reshape(len(images), -1)
    return pool, pool @ net.fc.weight.double().numpy().T, spatial


def inception_score_of_logits(logits):
    """One split (fewer than 5,000 images)."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return math.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))


def precision_recall_with_margin(ref, sample, k=3):
    """Precision and recall from exact squared distances, and the smallest gap between a distance and
    the radius it is compared with, less a bound on the float16 rounding of both (4 units of 2^-11 on
    |u|^2 + |v|^2 + 2|u.v|; a radius moves by at most its row's bound). Positive: the evaluator's
    float16 comparisons give these same answers."""
    def squared(a, b):
        g = a @ b.T
        na, nb = (a * a).sum(1)[:, None], (b * b).sum(1)[None, :]
        return np.maximum(na - 2 * g + nb, 0), 4 * 2 ** -11 * (na + nb + 2 * np.abs(g))
    (d_rr, e_rr), (d_ss, e_ss), (d_rs, e_rs) = squared(ref, ref), squared(sample, sample), squared(ref, sample)
    r_ref, r_sample = np.sort(d_rr, 1)[:, k], np.sort(d_ss, 1)[:, k]  # the point itself is the 0-th
    precision = (d_rs <= r_ref[:, None]).any(0).mean()
    recall = (d_rs <= r_sample[None, :]).any(1).mean()
    margin = min((np.abs(d_rs - r_ref[:, None]) - e_rs - e_rr.max(1)[:, None]).min(),
                 (np.abs(d_rs - r_sample[None, :]) - e_rs - e_ss.max(1)[None, :]).min())
    return precision, recall, margin


@pytest.fixture(scope='module')
def expected(inception_file):
    ref_pool, _, ref_spatial = torch_fidelity_features(inception_file, REF_IMAGES)
    sample_pool, sample_logits, sample_spatial = torch_fidelity_features(inception_file, SAMPLE_IMAGES)
    precision, recall, margin = precision_recall_with_margin(ref_pool, sample_pool)
    return dict(ref_pool=ref_pool, ref_spatial=ref_spatial, inception_score=inception_score_of_logits(sample_logits),
                fid=fid_without_sqrtm(sample_pool, ref_pool), sfid=fid_without_sqrtm(sample_spatial, ref_spatial),
                precision=precision, recall=recall, margin=margin)


@pytest.fixture(scope='module')
def command(inception_file, expected, tmp_path_factory):
    """evaluate.py run once (its two ~2048-d square roots are most of this file's time) on a reference
    batch laid out as the evaluator's: images, and statistics computed here from torch-fidelity's
    features (mu_s and sigma_s in (height, width, channel) order)."""
    folder = tmp_path_factory.mktemp('command')
    (mu, sigma), (mu_s, sigma_s) = unbiased_stats(expected['ref_pool']), unbiased_stats(expected['ref_spatial'])
    np.savez(folder / 'ref.npz', arr_0=REF_IMAGES, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(folder / 'sample.npz', arr_0=SAMPLE_IMAGES, labels=np.arange(len(SAMPLE_IMAGES)))
    r = subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), str(folder / 'ref.npz'), str(folder / 'sample.npz'),
                        '--inception_weights', inception_file, '--device', 'cpu', '--batch_size', '4'],
                       capture_output=True, text=True, cwd=folder)
    return r, folder


def test_end_to_end_metrics_match_torch_fidelity_features_and_numpy(command, expected):
    r, folder = command
    assert r.returncode == 0, r.stderr
    metrics = json.loads((folder / 'sample.metrics.json').read_text())
    for name, key in (('Inception Score', 'inception_score'), ('FID', 'fid'), ('sFID', 'sfid'), ('Precision', 'precision'), ('Recall', 'recall')):
        assert f'{name}: {metrics[key]}' in r.stdout
    # the expectations are not trivial, and float16 rounding cannot flip a comparison
    assert 0 < expected['precision'] < 1 and 0 < expected['recall'] < 1 and expected['margin'] > 0
    assert expected['inception_score'] > 1.2 and expected['fid'] > 1 and expected['sfid'] > 1
    assert (metrics['precision'], metrics['recall']) == (expected['precision'], expected['recall'])
    for key in ('inception_score', 'fid', 'sfid'):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
    assert (metrics['num_samples'], metrics['num_ref']) == (len(SAMPLE_IMAGES), len(REF_IMAGES))


def test_end_to_end_warns_once_about_the_small_set_and_nothing_else(command):
    """The sample's 6 images get one warning line (the reference's images are not counted: its stored
    statistics are used); no Python warning (scipy's singular matrix, torch's read-only array) remains."""
    r, _ = command
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if 'FID and sFID need thousands' in line]
    assert len(warned) == 1 and 'sample.npz holds 6' in warned[0] and 'ref.npz' not in warned[0]
    assert 'Warning' not in r.stderr and 'Traceback' not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- the command, network replaced

def small_features(seed, n):
    """Stand-ins for the network's features: pool (n, 5) and spatial (n, 3) small integers (float16
    distances between them are exact), logits (n, 4)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-4, 5, (n, 5)).astype(np.float32), (rng.standard_normal((n, 4)) * 2).astype(np.float32),
            rng.integers(-3, 4, (n, 3)).astype(np.float32))


def run_on_features(tmp_path, monkeypatch, capsys, ref_arrays, features):
    """main() on sample.npz and ref.npz (holding ref_arrays) with the network replaced by the features
    of each file; returns the metrics file and the captured output."""
    sample, ref = tmp_path / 'sample.npz', tmp_path / 'ref.npz'
    np.savez(sample, arr_0=np.zeros((len(features['sample'][0]), 8, 8, 3), np.uint8))
    np.savez(ref, **ref_arrays)
    by_path = {str(sample): features['sample'], str(ref): features.get('ref')}
    monkeypatch.setattr(evaluate, 'Inception', lambda weights, device: None)
    monkeypatch.setattr(evaluate, 'activations', lambda inception, path, batch_size: by_path[path])
    capsys.readouterr()
    run_main(evaluate, [str(ref), str(sample), '--inception_weights', str(sample), '--device', 'cpu'])
    return json.loads((tmp_path / 'sample.metrics.json').read_text()), capsys.readouterr()


def test_reference_with_statistics_only(tmp_path, monkeypatch, capsys):
    sample, ref = small_features(0, 12), small_features(1, 10)
    (mu, sigma), (mu_s, sigma_s) = unbiased_stats(ref[0].astype(np.float64)), unbiased_stats(ref[2].astype(np.float64))
    metrics, out = run_on_features(tmp_path, monkeypatch, capsys, dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s),
                                   dict(sample=sample))
    s = [f.astype(np.float64) for f in sample]
    assert metrics['fid'] == pytest.approx(fid_without_sqrtm(s[0], ref[0].astype(np.float64)), rel=1e-6)
    assert metrics['sfid'] == pytest.approx(fid_without_sqrtm(s[2], ref[2].astype(np.float64)), rel=1e-6)
    assert metrics['inception_score'] == pytest.approx(inception_score_of_logits(s[1]), rel=1e-5)
    assert (metrics['precision'], metrics['recall'], metrics['num_ref']) == (None, None, None)
    assert 'Precision: n/a' in out.out and 'Recall: n/a' in out.out
    assert out.err.count('FID and sFID need thousands') == 1 and 'holds 12' in out.err and 'ref.npz' not in out.err


def test_reference_with_images_only(tmp_path, monkeypatch, capsys):
    """Its statistics come from its images; integer features make float16 distances exact, ties included."""
    sample, ref = small_features(2, 12), small_features(3, 10)
    metrics, out = run_on_features(tmp_path, monkeypatch, capsys, dict(arr_0=np.zeros((10, 8, 8, 3), np.uint8)),
                                   dict(sample=sample, ref=ref))
    s, r = [f.astype(np.float64) for f in sample], [f.astype(np.float64) for f in ref]
    assert metrics['fid'] == pytest.approx(fid_without_sqrtm(s[0], r[0]), rel=1e-6)
    assert metrics['sfid'] == pytest.approx(fid_without_sqrtm(s[2], r[2]), rel=1e-6)
    precision, recall, _ = precision_recall_with_margin(r[0], s[0])
    assert 0 < precision < 1 and 0 < recall < 1
    assert (metrics['precision'], metrics['recall'], metrics['num_ref']) == (precision, recall, 10)
    warned = [line for line in out.err.splitlines() if 'FID and sFID need thousands' in line]
    assert len(warned) == 1 and 'holds 12' in warned[0] and 'holds 10' in warned[0]


# ----------------------------------------------------------------------------- bad input

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
