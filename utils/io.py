"""Images and arrays out: the reference's grid PNG and an npz of tokens, labels and images."""
import contextlib
import json
import os
import re

import numpy as np
import torch
from PIL import Image

from .errors import UserError, one_line


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name beside path to write to: renamed to path when the block ends, removed when it
    fails or is interrupted, so that path only ever holds a whole file (the process id keeps two
    torchrun processes writing the same file apart)."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_temporaries(folder, name=None):
    """Delete what atomic_path leaves behind when a process is killed mid-write (SIGKILL runs no clean-up):
    NAME.{pid}.tmp in folder, or with name=None every *.{pid}.tmp there, unless that process is still
    alive on this machine (another run sharing the folder may be writing). Returns the bytes freed."""
    pattern = re.compile((re.escape(name) if name else '.+') + r'\.(\d+)\.tmp')
    freed = 0
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file() and not process_alive(int(match.group(1))):
            freed += entry.stat().st_size
            os.remove(entry.path)
    return freed


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def human_size(nbytes):
    """'9.8 GB', '340 MB', '12 kB': enough digits to tell a small disk from an empty one."""
    for unit, size in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if nbytes >= size:
            return f'{nbytes / size:.1f} {unit}' if nbytes < 10 * size else f'{nbytes / size:.0f} {unit}'
    return f'{nbytes:.0f} bytes'


def save_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)


def check_same_settings(path, settings, what, advice, reasons=None):
    """A rerun must be the run its folder holds: False when path (a JSON of settings) does not exist yet,
    True when it holds these settings, else one line naming what differs (reasons: key -> why it matters)."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        old = json.load(f)
    differ = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if differ:
        k = differ[0]
        why = ''.join(dict.fromkeys(f'; {reasons[d]}' for d in differ if reasons and d in reasons))
        raise UserError(f'{what} holds a run with other settings ({", ".join(differ)}; e.g. {k}: {old.get(k)!r} there, '
                        f'{settings.get(k)!r} now{why}); {advice}')
    return True


def uint8_images(images_B3HW):
    """Images in [0, 1] -> uint8 (B, H, W, 3) on their device, truncated as the reference writes its PNGs
    (x * 255, cast)."""
    return images_B3HW.float().mul(255).permute(0, 2, 3, 1).to(torch.uint8)


def to_uint8(images_B3HW):
    """uint8_images as a numpy array."""
    return uint8_images(images_B3HW).cpu().numpy()


def grid(images_BHW3, nrow=8):
    """Images side by side, nrow per row, no padding; empty cells of the last row are white."""
    B, H, W, C = images_BHW3.shape
    rows = -(-B // nrow)
    cols = min(B, nrow)
    canvas = np.full((rows * H, cols * W, C), 255, dtype=np.uint8)
    for i, img in enumerate(images_BHW3):
        r, c = divmod(i, nrow)
        canvas[r * H:(r + 1) * H, c * W:(c + 1) * W] = img
    return canvas


def check_image_path(path, flag):
    if os.path.isdir(path):
        raise UserError(f'{flag} {path} is a folder; give a file name, e.g. {os.path.join(path, "grid.png")}')
    ext = os.path.splitext(path)[1].lower()
    if ext not in Image.registered_extensions():
        raise UserError(f'{flag} {path}: unknown image type {ext or "(no extension)"}; use .png')


def save_image(array_HW3, path):
    Image.fromarray(array_HW3).save(path)


def save_npz(path, **arrays):
    """Small arrays to an .npz, atomically (see write_npz_streaming)."""
    write_npz_streaming(path, {k: (np.shape(v), np.asarray(v).dtype, [np.asarray(v)]) for k, v in arrays.items()})


def write_npz_streaming(path, arrays, check=None):
    """Write an uncompressed .npz whose arrays arrive in pieces, so that 9.8 GB of images never sit
    in memory (let alone twice). arrays: {name: (shape, dtype, iterable of C-ordered chunks)}.
    Written to a temporary name and renamed when whole, and when check(temporary path), if given,
    returns without raising: a file under `path` is always a whole, checked one."""
    import zipfile
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, chunks) in arrays.items():
                with zf.open(f'{name}.npy', 'w', force_zip64=True) as f:
                    header = {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False, 'shape': tuple(shape)}
                    np.lib.format.write_array_header_1_0(f, header)
                    written = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        f.write(chunk.tobytes())
                        written += chunk.size
                    if written != int(np.prod(shape)):
                        raise RuntimeError(f'{name}: {written} elements written, {int(np.prod(shape))} expected')
        if check:
            check(tmp)


def npz_array_header(path, name):
    """(shape, dtype) of one array of an .npz, read from its header without loading it."""
    with _npz_member(path, name) as (shape, dtype, _):
        return shape, dtype


def iter_npz_array(path, name, batch):
    """One array of an .npz in chunks of `batch` rows, read from the archive as it goes (compressed
    or not), so that 50,000 images never sit in memory at once."""
    with _npz_member(path, name) as (shape, dtype, f):
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            data = bytearray(n * row_bytes)  # writable, so the rows can go to torch.from_numpy without a warning
            got = f.readinto(data)
            if got != n * row_bytes:
                raise UserError(f'{path}: {name} ends early, at row {start + got // max(row_bytes, 1)} of {shape[0]}')
            yield np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])


class _npz_member:
    def __init__(self, path, name):
        self.path, self.name = path, name

    def __enter__(self):
        import zipfile
        self.zf = zipfile.ZipFile(self.path)
        self.f = self.zf.open(f'{self.name}.npy')
        version = np.lib.format.read_magic(self.f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(self.f)
        if fortran:
            raise UserError(f'{self.path}: {self.name} is stored in Fortran order; save it C-ordered')
        return shape, dtype, self.f

    def __exit__(self, *exc):
        self.f.close()
        self.zf.close()


def fit_square(img, size, resample):
    """Shorter side to size, then the centred size x size square."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def open_image(path, mode, what, folder_hint):
    """An image file decoded into PIL mode ('RGB', 'L'); a folder or an unreadable file is one line."""
    if os.path.isdir(path):
        raise UserError(f'{path} is a folder; {folder_hint}')
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {what} {path} ({one_line(e)})') from None


def load_image(path, size=256):
    """An image file as RGB uint8 (size, size, 3) (see square_image). Also returns the file's own (width, height)."""
    img = open_image(path, 'RGB', 'image', 'give image files')
    return square_image(img, size), img.size


def square_image(img, size=256):
    """A decoded image as the models take it: RGB uint8 (size, size, 3), shorter side resized to size
    (bicubic), centre crop (an alpha channel is dropped, not composited)."""
    return np.asarray(fit_square(img.convert('RGB'), size, Image.BICUBIC))


def load_mask(path, image_sizes, size=256):
    """A mask image (white = regenerate) as bool (size, size) (see square_mask)."""
    img = open_image(path, 'L', 'mask', 'give the mask image')
    return square_mask(img, image_sizes, size, f'--mask {path}')


def square_mask(img, image_sizes, size=256, what='the mask'):
    """A greyscale mask (white = regenerate) as bool (size, size). It must be size x size, or the size of
    every input image, in which case it is resized and cropped as they are."""
    if img.size != (size, size):
        if any(s != img.size for s in image_sizes):
            raise UserError(f'{what} is {img.size[0]}x{img.size[1]}; it must be {size}x{size} or the size of every input image')
        img = fit_square(img, size, Image.NEAREST)
    return np.asarray(img) > 127
