"""Score a sample batch against a reference batch the way OpenAI's guided-diffusion evaluator
(evaluations/evaluator.py) does, in PyTorch: Inception Score, FID, sFID, precision and recall.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/code_n8.npz

Both files hold `arr_0` (uint8, N x H x W x 3); the reference batch may also hold its statistics
(`mu`, `sigma`, `mu_s`, `sigma_s`), which are then used for FID and sFID as the evaluator does.
Features come from the TensorFlow FID Inception-v3 as torch-fidelity ports it (its weights, and its
TF1-exact bilinear resize to 299). The metrics are printed and written to SAMPLE.metrics.json.
"""
import argparse
import os
import sys
import warnings
import zipfile
import zlib

import numpy as np
import torch
from scipy import linalg

from utils.cli import Parser, check_writable, main_guard, runtime
from utils.errors import UserError, one_line
from utils.io import iter_npz_array, npz_array_header, save_json
from utils.timing import progress

SPLIT_SIZE = 5000     # Inception Score splits, in order
NEIGHBOURS = 3        # k of the k-NN radii of precision and recall
PR_BATCH = 10000      # rows and columns of one block of pairwise distances
SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of mixed_6/conv (17 x 17 x 192)
FEW_IMAGES = 2048     # below this a 2048-d covariance is singular and FID is far from its large-set value
# what a damaged or non-npz file raises while it is read (zipfile's own error is no OSError or ValueError)
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def parser():
    p = Parser(description=__doc__.split('\n\n')[0])
    p.add_argument('ref_batch', help='reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)')
    p.add_argument('sample_batch', help='sample batch .npz (arr_0), e.g. the output of sample_CoDe.py')
    p.add_argument('--batch_size', type=int, default=64, help='images per Inception forward pass (default 64)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cuda, cuda:N or cpu (default: cuda if available, here %(default)s)')
    p.add_argument('--inception_weights', default=None,
                   help="local torch-fidelity Inception file (default: downloaded once into torch's hub cache)")
    return p


# ----------------------------------------------------------------------------- features

def inception_weights_path(local):
    """The Inception weights file: local, or torch-fidelity's release file in torch's hub cache."""
    if local:
        if os.path.isdir(local):
            raise UserError(f'--inception_weights {local} is a folder; give the weights file')
        if not os.path.isfile(local):
            raise UserError(f'--inception_weights: no such file {local}')
        return local
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(URL_INCEPTION_V3))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, path, hash_prefix=None, progress=True)
        except Exception as e:
            raise UserError(f'could not download the Inception weights ({type(e).__name__}); fetch {URL_INCEPTION_V3} '
                            f'and put it at {path}, or pass its path with --inception_weights') from None
    return path


class Inception:
    """torch-fidelity's TF-FID Inception-v3 returning the evaluator's three features per image:
    pool_3 (2048), the unbiased logits of softmax/logits/MatMul (1008) and mixed_6/conv's first 7
    channels flattened in (height, width, channel) order (17 * 17 * 7)."""

    def __init__(self, weights, device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        try:  # reading it with weights_only=True first proves the file holds tensors only
            torch.load(weights, map_location='cpu', weights_only=True)
        except Exception as e:
            raise UserError(f'{weights} is not an Inception weights file ({one_line(e)})') from None
        try:
            self.net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'],
                                                   feature_extractor_weights_path=weights).to(device)
        except RuntimeError as e:
            raise UserError(f'{weights} does not fit torch-fidelity\'s Inception-v3 ({one_line(e)})') from None
        self.device, self.spatial = device, None
        # TF's mixed_6 is torch-fidelity's Mixed_6d; mixed_6/conv is its 1x1 branch, after the ReLU
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: setattr(self, 'spatial', out))

    @torch.inference_mode()
    def __call__(self, images_NHW3):
        x = torch.from_numpy(np.ascontiguousarray(images_NHW3)).to(self.device).permute(0, 3, 1, 2)
        pool, logits = self.net(x)
        spatial = self.spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        return pool.cpu().numpy(), logits.cpu().numpy(), spatial.float().cpu().numpy()


def check_images(path):
    """Shape and dtype of arr_0, or a one-line error."""
    try:
        shape, dtype = npz_array_header(path, 'arr_0')
    except KeyError:
        return None
    except READ_ERRORS as e:
        raise UserError(f'cannot read {path} as an .npz ({one_line(e)})') from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise UserError(f'{path}: arr_0 must be uint8 N x H x W x 3, found {dtype} {shape}')
    if shape[0] < 2:
        raise UserError(f'{path}: arr_0 holds {shape[0]} image(s); at least 2 are needed')
    return shape


def activations(inception, path, batch_size):
    pools, logits, spatials = [], [], []
    n = npz_array_header(path, 'arr_0')[0][0]
    try:  # a damaged member shows only while it is read (a CRC error at its end, a zlib error)
        for batch in progress(iterable=iter_npz_array(path, 'arr_0', batch_size), total=-(-n // batch_size), desc=os.path.basename(path), unit='batch'):
            pool, logit, spatial = inception(batch)
            pools.append(pool)
            logits.append(logit)
            spatials.append(spatial)
    except (EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f'cannot read {path} ({one_line(e)})') from None
    return np.concatenate(pools), np.concatenate(logits), np.concatenate(spatials)


# ----------------------------------------------------------------------------- the evaluator's math

def statistics(features):
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with the evaluator's two guards: a non-finite
    square root is retried with eps on the diagonals, and a small imaginary part is dropped (a large
    one is an error)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f'statistics of different sizes: {mu1.shape} and {mu2.shape}')
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns "Matrix is singular" whenever fewer images than dimensions went into a covariance;
        # the non-finite case below has its own warning and main() warns about small sets once
        warnings.simplefilter('ignore', linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f'the product of the covariances is nearly singular; adding {eps} to their diagonals')
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            # covariances never give this; statistics that are not covariances (a damaged mu/sigma) do
            raise UserError(f'imaginary component {np.max(np.abs(covmean.imag)):.3g} in the square root of the covariance '
                            'product: are sigma and sigma_s covariance matrices?')
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, split_size=SPLIT_SIZE):
    """exp(E_x KL(p(y|x) || p(y))), averaged over consecutive splits of split_size images."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def softmax(logits):
    return torch.from_numpy(logits).softmax(dim=1).numpy()


def squared_distances(u, v):
    """Pairwise squared Euclidean distances, as the evaluator computes them: in float16, falling back
    to float32 only if a float16 value overflows."""
    def block(a, b):
        d = (a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]
        return d.clamp_min(0)
    d = block(u.half(), v.half())
    return d.float() if torch.isfinite(d).all() else block(u.float(), v.float())


def manifold_radii(features, k=NEIGHBOURS, batch=PR_BATCH):
    """Squared distance of every point to its k-th nearest neighbour (itself counted as the 0-th),
    keeping only the k+1 smallest per row while the column blocks go by."""
    radii = []
    for r in range(0, len(features), batch):
        rows = features[r:r + batch]
        best = None
        for c in range(0, len(features), batch):
            d = squared_distances(rows, features[c:c + batch])
            best = d if best is None else torch.cat((best, d), dim=1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(ref, sample, k=NEIGHBOURS, batch=PR_BATCH):
    """Precision: the share of samples inside some reference point's k-NN ball; recall: the share of
    reference points inside some sample's k-NN ball (Kynkaanniemi et al. 2019, as the evaluator has it)."""
    ref_radii, sample_radii = manifold_radii(ref, k, batch), manifold_radii(sample, k, batch)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_in = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)
    for r in range(0, len(ref), batch):
        for c in range(0, len(sample), batch):
            d = squared_distances(ref[r:r + batch], sample[c:c + batch])
            ref_in[r:r + batch] |= (d <= sample_radii[None, c:c + batch]).any(dim=1)
            sample_in[c:c + batch] |= (d <= ref_radii[r:r + batch, None]).any(dim=0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------- the command

def reference_statistics(path):
    """The reference batch's stored statistics, as the evaluator uses them, or None."""
    try:
        with np.load(path) as f:
            if 'mu' not in f.files:
                return None
            missing = [k for k in ('sigma', 'mu_s', 'sigma_s') if k not in f.files]
            if missing:
                raise UserError(f'{path} holds mu but not {", ".join(missing)}')
            return (f['mu'], f['sigma']), (f['mu_s'], f['sigma_s'])
    except READ_ERRORS as e:
        raise UserError(f'cannot read the statistics in {path} ({one_line(e)})') from None


def metrics_path(sample_batch):
    """SAMPLE.metrics.json beside the sample batch."""
    return os.path.splitext(sample_batch)[0] + '.metrics.json'


def main():
    args = parser().parse_args()
    # the other scripts' device checks and wording; fp32, so that CUDA runs with TF32 off
    device, _ = runtime(argparse.Namespace(device=args.device, dtype='fp32'))
    for path in (args.ref_batch, args.sample_batch):
        if os.path.isdir(path):
            raise UserError(f'{path} is a folder; give an .npz file')
        if not os.path.isfile(path):
            raise UserError(f'no such file: {path}')
    if args.batch_size < 1:
        raise UserError('--batch_size must be >= 1')
    out = metrics_path(args.sample_batch)
    check_writable(out, 'the metrics file')  # before minutes of Inception passes, not after
    ref_shape, sample_shape = check_images(args.ref_batch), check_images(args.sample_batch)
    if sample_shape is None:
        raise UserError(f'{args.sample_batch} has no arr_0')
    ref_stats = reference_statistics(args.ref_batch)
    if ref_shape is None and ref_stats is None:
        raise UserError(f'{args.ref_batch} holds neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)')
    # the reference's images count only where its statistics come from them
    counted = ((args.sample_batch, sample_shape), (args.ref_batch, ref_shape if ref_stats is None else None))
    few = [f'{path} holds {shape[0]}' for path, shape in counted if shape is not None and shape[0] < FEW_IMAGES]
    if few:
        print(f'warning: {"; ".join(few)} images: FID and sFID need thousands (the evaluator\'s reference batches hold '
              f'10,000 or more); under {FEW_IMAGES:,} they are far from their large-set values', file=sys.stderr)
    inception = Inception(inception_weights_path(args.inception_weights), device)

    sample_pool, sample_logits, sample_spatial = activations(inception, args.sample_batch, args.batch_size)
    ref_pool = None
    if ref_shape is not None:
        ref_pool, _, ref_spatial = activations(inception, args.ref_batch, args.batch_size)
        if ref_stats is None:
            ref_stats = statistics(ref_pool), statistics(ref_spatial)
    results = dict(
        inception_score=inception_score(softmax(sample_logits)),
        fid=frechet_distance(*statistics(sample_pool), *ref_stats[0]),
        sfid=frechet_distance(*statistics(sample_spatial), *ref_stats[1]),
        precision=None, recall=None)
    if ref_pool is None:
        print('note: precision and recall need the reference images; this reference batch holds statistics only')
    elif min(len(ref_pool), len(sample_pool)) <= NEIGHBOURS:
        print(f'note: precision and recall need more than {NEIGHBOURS} images in each batch')
    else:
        results['precision'], results['recall'] = precision_recall(torch.from_numpy(ref_pool).to(device),
                                                                   torch.from_numpy(sample_pool).to(device))
    for name, key in (('Inception Score', 'inception_score'), ('FID', 'fid'), ('sFID', 'sfid'), ('Precision', 'precision'), ('Recall', 'recall')):
        print(f'{name}: {results[key] if results[key] is not None else "n/a"}')
    save_json(out, dict(results, ref_batch=os.path.abspath(args.ref_batch), sample_batch=os.path.abspath(args.sample_batch),
                        num_samples=int(sample_shape[0]), num_ref=None if ref_shape is None else int(ref_shape[0])))
    print(f'metrics written to {out}')


if __name__ == '__main__':
    main_guard(main)
