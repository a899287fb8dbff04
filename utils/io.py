"""Images and arrays out: the reference's grid PNG and an npz of tokens, labels and images."""
import os

import numpy as np
import torch
from PIL import Image

from .errors import UserError


def to_uint8(images_B3HW):
    """Images in [0, 1] -> uint8 (B, H, W, 3), truncated as the reference writes its PNGs (x * 255, cast)."""
    return images_B3HW.mul(255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


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
    ext = os.path.splitext(path)[1].lower()
    if ext not in Image.registered_extensions():
        raise UserError(f'{flag} {path}: unknown image type {ext or "(no extension)"}; use .png')


def save_image(array_HW3, path):
    Image.fromarray(array_HW3).save(path)


def save_npz(path, **arrays):
    """np.savez to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = f'{path}.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
