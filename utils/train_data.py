"""Training data: an ImageFolder tree encoded once by the VQVAE into multi-scale tokens, cached on disk.

The cache folder holds meta.json (what was encoded: the file list's digest, the VQVAE, hflip),
shards/ (one .npy of int16 tokens per SHARD_SIZE images, each written whole or not at all, so a
killed run keeps what it finished) and, once every shard exists, tokens.npy (rows: image-major,
then original before mirrored) and labels.npy. Under torchrun the processes share the shards.
Training memory-maps tokens.npy and never reads an image.
"""
import hashlib
import os

import numpy as np
import torch
from PIL import Image

from . import distributed, timing
from .errors import UserError, one_line
from .io import atomic_path, check_same_settings, fit_square, save_json

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
SHARD_SIZE = 1000


def scan_image_folder(root, flag):
    """(class names, files relative to root, labels): one folder per class, sorted folder order gives
    the labels 0, 1, ...; the images of a class are every file with an image extension below its folder."""
    if not os.path.isdir(root):
        raise UserError(f'{flag} {root}: no such folder')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise UserError(f'{flag} {root}: no class folders (expected one folder of images per class, as ImageNet\'s train/)')
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(os.path.relpath(os.path.join(d, f), root)
                       for d, _, names in os.walk(os.path.join(root, name), followlinks=True)
                       for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise UserError(f'{flag} {root}: class folder {name} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
        files += found
        labels += [label] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def read_image(path):
    """RGB uint8 (256, 256, 3): shorter side to 256 (bicubic), centre crop; 256x256 files as they are.
    Returns (array, None) or (None, why) so that DataLoader workers never raise."""
    try:
        with Image.open(path) as img:
            img = img.convert('RGB')
        return np.array(fit_square(img, 256, Image.BICUBIC)), None  # a writable copy, for torch.from_numpy
    except Exception as e:  # PIL raises many types for a broken file
        return None, one_line(e)


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        array, why = read_image(self.paths[i])
        return (torch.from_numpy(array) if array is not None else torch.zeros(0, dtype=torch.uint8)), i, why or ''


def _as_columns(items):
    return list(zip(*items))  # (arrays, indices, errors): images may fail, so no stacking here


@torch.no_grad()
def encode(vae, images_BHW3, hflip):
    """uint8 images -> int16 tokens (B * views, L), each image's original then its mirror image."""
    x = images_BHW3.to(next(vae.parameters()).device).permute(0, 3, 1, 2).float().div(255).mul(2).sub(1)
    if hflip:
        x = torch.stack((x, x.flip(-1)), dim=1).flatten(0, 1)
    with torch.autocast(x.device.type, enabled=False):  # tokens do not depend on --dtype
        tokens, _ = vae.encode(x)
    return torch.cat(tokens, dim=1).to(torch.int16).cpu().numpy()


def _encode_shard(vae, root, files, hflip, batch_size, workers, progress, path):
    loader = torch.utils.data.DataLoader(_Images([os.path.join(root, f) for f in files]), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_as_columns)
    out = []
    for arrays, indices, whys in loader:
        for i, why in zip(indices, whys):
            if why:
                raise UserError(f'cannot read image {os.path.join(root, files[i])} ({why}); remove or replace it')
        out.append(encode(vae, torch.stack(arrays), hflip))
        progress.update(len(arrays))
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.save(f, np.concatenate(out))


def token_cache(cache_dir, root, vae, vae_id, hflip, flag, rank=0, world=1, batch_size=32, workers=4):
    """(tokens (n, L) int16 memory-mapped, labels (n,), number of classes) of the ImageFolder at root,
    encoding what the cache does not hold yet. Every process calls it; they split the shards."""
    classes, files, labels = scan_image_folder(root, flag)
    meta = dict(version=1, images=len(files), classes=len(classes),
                files_sha256=hashlib.sha256('\n'.join(files).encode()).hexdigest(),
                labels_sha256=hashlib.sha256(labels.tobytes()).hexdigest(),
                vae=vae_id, hflip=hflip, shard_size=SHARD_SIZE, tokens=sum(pn * pn for pn in vae.patch_nums))
    meta_path = os.path.join(cache_dir, 'meta.json')
    check_same_settings(meta_path, meta, f'token cache {cache_dir}', 'use another cache folder or delete it')
    shard_dir = os.path.join(cache_dir, 'shards')
    final = os.path.join(cache_dir, 'tokens.npy')
    if rank == 0:
        os.makedirs(shard_dir, exist_ok=True)
        save_json(meta_path, meta)
    distributed.barrier()
    views = 2 if hflip else 1
    if not os.path.exists(final):
        starts = range(0, len(files), SHARD_SIZE)
        todo = [s for s in starts if not os.path.exists(os.path.join(shard_dir, f'{s:09d}.npy'))]
        distributed.barrier()  # every process has listed the shards before any writes one
        mine = todo[rank::world]
        with timing.progress(rank == 0, total=len(files), initial=len(files) - sum(min(SHARD_SIZE, len(files) - s) for s in todo),
                             unit='img', desc=f'encoding {os.path.basename(root.rstrip("/"))}', leave=False) as progress:
            for s in mine:  # other processes encode alongside; rank 0's bar counts its own share
                _encode_shard(vae, root, files[s:s + SHARD_SIZE], hflip, batch_size, workers, progress,
                              os.path.join(shard_dir, f'{s:09d}.npy'))
        distributed.barrier()
        if rank == 0:
            with atomic_path(final) as tmp:
                out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.int16, shape=(len(files) * views, meta['tokens']))
                for s in starts:
                    out[s * views:(s + SHARD_SIZE) * views] = np.load(os.path.join(shard_dir, f'{s:09d}.npy'))
                out.flush()
                del out
            print(f'{len(files)} images{" and their mirror images" if hflip else ""} of {root} encoded into {final}')
        distributed.barrier()
    return np.load(final, mmap_mode='r'), np.repeat(labels, views), len(classes)
