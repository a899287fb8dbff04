"""Training data: an ImageFolder tree, its ImageNet class indices, VAR's crops, and the token cache.

Rows: every image once (or, with --hflip, twice: the image, then its mirror image), in the sorted
file order. Crops as FoundationVision/VAR's utils/data.py: the shorter side resized to
round(1.125 * 256) = 288 with LANCZOS, then a random 256x256 crop (--crop var: fresh for every row
and epoch, drawn from a generator seeded by (--seed, epoch, row), so a resumed run draws the same
ones) or the centre one (--crop center, VAR's validation crop). --crop none takes 256x256 files as
they are.

The token cache (--crop center and none) holds meta.json (the VQVAE, crop and hflip it was made
with), shards/ (the tokens of a run of consecutive files each, named by the digest of those files'
names, sizes and modification times, written whole or not at all) and tokens.npy (every row, in
order), assembled from the shards that index.json lists. A file removed, added or replaced changes
the digest of its own shard only (and of a neighbour when it was the last of one), so a rerun encodes
just those. Under torchrun the processes share the shards.
"""
import hashlib
import json
import os
import re
import zlib

import numpy as np
import torch
from PIL import Image

from utils import distributed, timing
from utils.errors import UserError, one_line
from utils.io import atomic_path, check_same_settings, remove_temporaries, save_json

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
SIZE = 256
MID_SIZE = round(1.125 * SIZE)  # VAR's mid_reso: 288
CROPS = ('var', 'center', 'none')
SHARD_MEAN, SHARD_MAX = 1000, 4000  # files per shard: 1,000 on average, never more than 4,000
SYNSET = re.compile(r'n\d{8}')


def imagenet_synsets():
    """ImageNet-1k's 1,000 WordNet ids, sorted: position = the standard class index (torchvision's
    order). The file is timm 1.0.31's timm/data/_info/imagenet_synsets.txt (PyPI wheel), unchanged: sha256
    70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15."""
    with open(os.path.join(os.path.dirname(__file__), 'imagenet_synsets.txt')) as f:
        return f.read().split()


def scan_image_folder(root, flag):
    """(class folder names, files relative to root, the class folder of each file as a position in the
    sorted names): the images of a class are every file with an image extension below its folder."""
    if os.path.isfile(root):
        raise UserError(f'{flag} {root} is a file; give a folder of class folders (one per class, as ImageNet\'s train/)')
    if not os.path.isdir(root):
        raise UserError(f'{flag} {root}: no such folder')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise UserError(f'{flag} {root}: no class folders (expected one folder of images per class, as ImageNet\'s train/)')
    files, positions = [], []
    for position, name in enumerate(classes):
        found = sorted(os.path.relpath(os.path.join(d, f), root)
                       for d, _, names in os.walk(os.path.join(root, name), followlinks=True)
                       for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise UserError(f'{flag} {root}: class folder {name} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
        files += found
        positions += [position] * len(found)
    return classes, files, np.asarray(positions, dtype=np.int64)


def read_class_map(path):
    """--class_map: a JSON object, class folder name -> class index."""
    if os.path.isdir(path):
        raise UserError(f'--class_map {path} is a folder; give a JSON file (class folder name -> class index)')
    try:
        with open(path) as f:
            mapping = json.load(f)
    except FileNotFoundError:
        raise UserError(f'--class_map {path}: no such file') from None
    except (OSError, ValueError) as e:
        raise UserError(f'--class_map {path}: not a JSON file ({one_line(e)})') from None
    if not isinstance(mapping, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in mapping.values()):
        raise UserError(f'--class_map {path} must be a JSON object of class folder name -> class index (an integer)')
    return mapping


def class_indices(classes, num_classes, flag, class_map=None, map_path=None):
    """The model's class index of each class folder: from --class_map; else, for folders named by ImageNet
    synsets (n01440764, ...), their standard ImageNet index whatever subset is present; else the sorted
    order, when there are exactly as many folders as the model has classes."""
    if class_map is not None:
        unknown = sorted(set(class_map) - set(classes))
        if unknown:
            raise UserError(f'--class_map {map_path} names {len(unknown)} folder(s) that {flag} does not hold: {", ".join(unknown[:3])}')
        missing = [c for c in classes if c not in class_map]
        if missing:
            raise UserError(f'--class_map {map_path} gives no index for {len(missing)} class folder(s) of {flag}: {", ".join(missing[:3])}')
        bad = [c for c in classes if not 0 <= class_map[c] < num_classes]
        if bad:
            raise UserError(f'--class_map {map_path}: {bad[0]} -> {class_map[bad[0]]} is outside the student\'s classes 0-{num_classes - 1}')
        return [class_map[c] for c in classes]
    if all(SYNSET.fullmatch(c) for c in classes):
        index = {s: i for i, s in enumerate(imagenet_synsets())}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise UserError(f'{flag}: class folder {unknown[0]} is not one of ImageNet\'s 1,000 synsets; give --class_map FILE')
        if num_classes != len(index):
            raise UserError(f'{flag} has ImageNet synset folders but the student has {num_classes} classes, not 1,000; '
                            f'give --class_map FILE')
        return [index[c] for c in classes]
    if len(classes) != num_classes:
        raise UserError(f'{flag} has {len(classes)} class folders ({", ".join(classes[:3])}{", ..." if len(classes) > 3 else ""}), '
                        f'the student {num_classes} classes: name the folders by ImageNet synset (n01440764, ...) '
                        f'or give --class_map FILE (folder name -> class index)')
    return list(range(len(classes)))


# ----------------------------------------------------------------------------- crops

def resize_shorter(img, size=MID_SIZE):
    """Shorter side to size with LANCZOS, the longer one scaled and truncated (torchvision's Resize(size))."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    return img.resize((size, new_long) if w <= h else (new_long, size), Image.LANCZOS)


def crop_seed(seed, epoch, row):
    """The generator seed of a row's random crop in an epoch."""
    return int.from_bytes(hashlib.sha256(f'{seed},{epoch},{row}'.encode()).digest()[:8], 'little') >> 1


def crop_box(width, height, mode, seed=None):
    """(left, top) of the 256x256 crop: random as torchvision's RandomCrop (top, then left, each
    torch.randint from one generator), or central as its CenterCrop."""
    if mode == 'var':
        g = torch.Generator().manual_seed(seed)
        top = int(torch.randint(0, height - SIZE + 1, (1,), generator=g))
        return int(torch.randint(0, width - SIZE + 1, (1,), generator=g)), top
    return int(round((width - SIZE) / 2.0)), int(round((height - SIZE) / 2.0))


def load_view(path, mode, mirrored=False, seed=None):
    """One row's image as RGB uint8 (256, 256, 3), or (None, why) when the file cannot be used: returned,
    not raised, so that DataLoader workers never raise."""
    try:
        with Image.open(path) as img:
            img = img.convert('RGB')
    except Exception as e:  # PIL raises many types for a broken file
        return None, one_line(e)
    if mode == 'none':
        if img.size != (SIZE, SIZE):
            return None, f'{img.size[0]}x{img.size[1]}, and --crop none takes {SIZE}x{SIZE} images only'
    else:
        img = resize_shorter(img)
        left, top = crop_box(img.width, img.height, mode, seed)
        img = img.crop((left, top, left + SIZE, top + SIZE))
    array = np.array(img)  # a writable copy, for torch.from_numpy
    return (np.ascontiguousarray(array[:, ::-1]) if mirrored else array), None


@torch.no_grad()
def encode(vae, images_BHW3):
    """uint8 images -> int16 tokens (B, L). In fp32 whatever --dtype, as VAR encodes."""
    x = images_BHW3.to(next(vae.parameters()).device).permute(0, 3, 1, 2).float().div(255).mul(2).sub(1)
    with torch.autocast(x.device.type, enabled=False):
        tokens, _ = vae.encode(x)
    return torch.cat(tokens, dim=1).to(torch.int16)


def _item(root, files, views, row, mode, seed=None):
    path = os.path.join(root, files[row // views])
    array, why = load_view(path, mode, row % views == 1, seed)
    return (torch.from_numpy(array) if array is not None else torch.zeros(0, dtype=torch.uint8)), path, why or ''


class Views(torch.utils.data.Dataset):
    """Every row of some files as uint8 images (a file that fails gives an empty array and the reason)."""

    def __init__(self, root, files, views, mode):
        self.root, self.files, self.views, self.mode = root, files, views, mode

    def __len__(self):
        return len(self.files) * self.views

    def __getitem__(self, i):
        return _item(self.root, self.files, self.views, i, self.mode)


def check_loaded(arrays, paths, whys, fix):
    for path, why in zip(paths, whys):
        if why:
            raise UserError(f'cannot use image {path} ({why}); {fix}')
    return torch.stack(arrays)


def _as_is(item):
    return item


def _columns(items):
    return list(zip(*items))  # (arrays, paths, errors): images may fail, so no stacking here


# ----------------------------------------------------------------------------- the token cache

def read_json(path):
    with open(path) as f:
        return json.load(f)


def shard_starts(files):
    """Where each shard begins: after a file whose name hashes to 0 modulo SHARD_MEAN (or after SHARD_MAX
    files), so the boundaries move only where the files do."""
    starts = [0]
    for i in range(1, len(files)):
        if zlib.crc32(files[i - 1].encode()) % SHARD_MEAN == 0 or i - starts[-1] >= SHARD_MAX:
            starts.append(i)
    return starts


def shard_keys(root, files, starts):
    keys = []
    for a, b in zip(starts, starts[1:] + [len(files)]):
        h = hashlib.sha256()
        for f in files[a:b]:
            st = os.stat(os.path.join(root, f))
            h.update(f'{f}\t{st.st_size}\t{st.st_mtime_ns}\n'.encode())
        keys.append(h.hexdigest()[:24])
    return keys


def _encode_shard(vae, dataset, batch_size, workers, progress, path):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_columns)
    out = []
    for arrays, paths, whys in loader:
        images = check_loaded(arrays, paths, whys, 'remove or replace it and rerun: only its shard is encoded again')
        out.append(encode(vae, images).cpu().numpy())
        progress.update(len(arrays))
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.save(f, np.concatenate(out))


def token_cache(cache_dir, root, files, vae, vae_id, mode, hflip, rank=0, world=1, batch_size=64, workers=4):
    """Tokens (rows, L) int16, memory-mapped, of the files below root, encoding the shards the cache does
    not hold yet. Every process calls it; they split the shards."""
    views = 2 if hflip else 1
    L = sum(pn * pn for pn in vae.patch_nums)
    meta = dict(version=2, vae=vae_id, crop=mode, hflip=hflip, tokens=L)
    meta_path = os.path.join(cache_dir, 'meta.json')
    check_same_settings(meta_path, meta, f'token cache {cache_dir}', 'use another --token_cache folder or delete it')
    shard_dir, final, index_path = (os.path.join(cache_dir, n) for n in ('shards', 'tokens.npy', 'index.json'))
    starts = shard_starts(files)
    keys = shard_keys(root, files, starts)
    bounds = list(zip(starts, starts[1:] + [len(files)]))
    if rank == 0:
        os.makedirs(shard_dir, exist_ok=True)
        for folder, name in ((shard_dir, None), (cache_dir, 'meta.json'), (cache_dir, 'tokens.npy'), (cache_dir, 'index.json')):
            remove_temporaries(folder, name)  # a killed encoder's half-written shards and files
        save_json(meta_path, meta)
    distributed.barrier()
    current = os.path.exists(final) and os.path.exists(index_path) and read_json(index_path) == keys
    if not current:
        todo = [i for i, k in enumerate(keys) if not os.path.exists(os.path.join(shard_dir, f'{k}.npy'))]
        distributed.barrier()  # every process has listed the shards before any writes one
        left = sum(bounds[i][1] - bounds[i][0] for i in todo)
        if rank == 0 and todo and len(todo) < len(keys):
            print(f'token cache {cache_dir}: {len(keys) - len(todo)} of {len(keys)} shards kept, encoding {left} images')
        with timing.progress(rank == 0, total=len(files) * views, initial=(len(files) - left) * views, unit='img',
                             desc=f'encoding {os.path.basename(root.rstrip("/"))}', leave=False) as progress:
            for i in todo[rank::world]:  # other processes encode alongside; rank 0's bar counts its own share
                a, b = bounds[i]
                dataset = Views(root, files[a:b], views, mode)
                _encode_shard(vae, dataset, batch_size, workers, progress, os.path.join(shard_dir, f'{keys[i]}.npy'))
        distributed.barrier()
        if rank == 0:
            with atomic_path(final) as tmp:
                out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.int16, shape=(len(files) * views, L))
                for (a, b), k in zip(bounds, keys):
                    out[a * views:b * views] = np.load(os.path.join(shard_dir, f'{k}.npy'))
                out.flush()
                del out
            save_json(index_path, keys)
            print(f'{len(files)} images{" and their mirror images" if hflip else ""} of {root} encoded into {final}')
        distributed.barrier()
    return np.load(final, mmap_mode='r')


def batch_rows(step, batch_size, n, seed):
    """(rows, epochs) of global batch `step`: consecutive slices of one permutation of the n rows per epoch."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, at = np.divmod(positions, n)
    rows = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + int(epoch))).numpy()
        rows[epochs == epoch] = perm[at[epochs == epoch]]
    return rows, epochs


class CropStream(torch.utils.data.IterableDataset):
    """--crop var: this process's share of the rows of global batches first, first+1, ..., decoded and
    cropped by --workers processes a few steps ahead (worker k makes every k-th step; the loader takes
    them in turn). A crop is a function of (--seed, epoch, row)."""

    def __init__(self, root, files, views, n, batch_size, share, seed, first):
        self.root, self.files, self.views, self.n, self.batch_size = root, files, views, n, batch_size
        self.share, self.seed, self.first = share, seed, first

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, every = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.first + k, 2 ** 62, every):
            rows, epochs = batch_rows(step, self.batch_size, self.n, self.seed)
            yield _columns([_item(self.root, self.files, self.views, r, 'var', crop_seed(self.seed, e, r))
                            for r, e in zip(rows[self.share], epochs[self.share])])


def crop_stream(root, files, views, batch_size, share, seed, first, workers):
    """An iterator of (uint8 images (b, 256, 256, 3)) for global steps first, first+1, ..."""
    dataset = CropStream(root, files, views, len(files) * views, batch_size, share, seed, first)
    for arrays, paths, whys in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is):
        yield check_loaded(arrays, paths, whys, 'replace it with a readable image of the same name and rerun '
                                                '(the run goes on from its last saved state)')
