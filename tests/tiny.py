"""Tiny models with deterministic weights: the stand-ins for the real checkpoints in tests.

The weight rule is the one the reference-parity fixtures were produced with
(tests/fixtures/expected.npz): every parameter is drawn from a generator seeded with the CRC32
of its own name plus a per-model salt, so the weights do not depend on construction order.
"""
import math
import zlib

import torch

from models import VAR, VQVAE
from utils.checkpoints import official_var_state_dict

VAE_SALT, DRAFTER_SALT, REFINER_SALT, MIDDLE_SALT = 0, 1, 2, 3
SPECIAL = {'class_emb.weight', 'pos_start', 'pos_1LC', 'lvl_embed.weight'}


def rule_value(name, shape, salt):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + salt)
    z = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith('scale_mul_1H11'):
        return math.log(4.0) + 0.1 * z
    if len(shape) == 1 and name.endswith('.weight'):
        return 1.0 + 0.1 * z
    if len(shape) == 1:
        return 0.02 * z
    if name in SPECIAL:
        return 0.5 * z
    if name == 'quantize.embedding.weight':
        return z
    if name == 'head.weight':
        return 0.25 * z
    return z / math.sqrt(math.prod(shape[1:]))


def apply_rule(model, salt):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(rule_value(name, tuple(p.shape), salt))
    return model.eval().requires_grad_(False)


def tiny_vae():
    return apply_rule(VQVAE(vocab_size=4096, Cvae=32, ch=32), VAE_SALT)


def tiny_drafter():
    return apply_rule(VAR(depth=2, embed_dim=128, num_heads=2), DRAFTER_SALT)


def tiny_refiner():
    return apply_rule(VAR(depth=1, embed_dim=64, num_heads=1), REFINER_SALT)


def tiny_middle():
    """A third model for cascades (drafter -> middle -> refiner); no golden fixture uses it."""
    return apply_rule(VAR(depth=1, embed_dim=128, num_heads=2), MIDDLE_SALT)


def official_state_dict(model):
    """The state dict as the official code saves it: with the buffers this code derives instead of
    loading (VAR's level index, training mask and zero key bias; the VQVAE's usage statistic)."""
    if isinstance(model, VAR):
        return official_var_state_dict(model.state_dict(), model)  # what finetune_CoDe.py writes, too
    sd = dict(model.state_dict())
    sd['quantize.ema_vocab_hit_SV'] = torch.zeros(len(model.patch_nums), model.vocab_size)
    return sd


def save_checkpoints(folder):
    """Write the tiny VQVAE, drafter, refiner and middle model as official-format checkpoint files; returns their paths."""
    paths = {}
    for name, build in (('vae', tiny_vae), ('drafter', tiny_drafter), ('refiner', tiny_refiner), ('middle', tiny_middle)):
        paths[name] = str(folder / f'tiny_{name}.pth')
        torch.save(official_state_dict(build()), paths[name])
    return paths
