"""The one sampling loop: plain VAR, CoDe and inpainting are schedules of models over the 10 scales.

A schedule is a list of stages, each a model and the scale it stops before:
    plain VAR:  [Stage(var, 10)]
    CoDe:       [Stage(drafter, N), Stage(refiner, 10)]
When the schedule changes model, the new model first runs the scales already decided through
its own blocks to fill its KV cache (prefill, no sampling), then samples the rest. The random
generator carries on across the handoff, so the stream is the one a single model would use.
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .var import VAR, GrowingKVCache
from .vqvae import VQVAE


class Stage(NamedTuple):
    model: VAR
    stop: int  # this stage samples scales [previous stop, stop)


def code_schedule(drafter: VAR, refiner: VAR, draft_steps: int) -> List[Stage]:
    """CoDe: the drafter samples the first draft_steps scales, the refiner the rest; 10 = drafter alone."""
    num_scales = len(drafter.patch_nums)
    if draft_steps >= num_scales:
        return [Stage(drafter, num_scales)]
    return [Stage(drafter, draft_steps), Stage(refiner, num_scales)]


def filter_logits_(logits_BlV, top_k: int, top_p: float):
    """Top-k then top-p (nucleus) filtering over the whole vocabulary, in place, as the reference
    does; 0 switches a filter off. Top-k keeps every logit >= the k-th largest (ties kept). Top-p
    sorts what is left ascending and drops the longest prefix whose probability mass is <= 1 - top_p,
    always keeping the top token."""
    if top_k > 0:
        kth = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_BlV.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    return logits_BlV


def exponential_noise(shape_like, generator):
    """q ~ Exp(1), one per vocabulary entry: torch.multinomial(p, 1) returns argmax(p / q) with
    exactly this draw. The stream use depends only on the shape, which is what lets a refiner
    continue the drafter's generator."""
    return torch.empty_like(shape_like).exponential_(generator=generator)


def sample_full(logits_BlV, top_k: int, top_p: float, temp: float, generator):
    """The straightforward sampler: filter the whole vocabulary (in place: --more_smooth reads the
    filtered logits), temper, draw. Draws what torch.multinomial draws, without its host sync."""
    B, l, V = logits_BlV.shape
    probs = (filter_logits_(logits_BlV, top_k, top_p) / temp).softmax(dim=-1).view(-1, V)
    return (probs / exponential_noise(probs, generator)).argmax(dim=-1).view(B, l)


def sample_top_k(logits_BlV, top_k: int, top_p: float, temp: float, generator):
    """The same draw as sample_full, computed on the k survivors of top-k instead of the whole
    vocabulary: no sort of 4096 logits per token. The noise is still drawn for every vocabulary
    entry so the random stream (and so every later token) stays the reference's.
    (Logits tied with the k-th largest: the reference keeps them all, this keeps k.)"""
    B, l, V = logits_BlV.shape
    logits = logits_BlV.view(-1, V)
    vals, idx = logits.topk(top_k, dim=-1, largest=True, sorted=True)
    vals, idx = vals.flip(-1), idx.flip(-1)  # ascending, as top-p reads them; the top token is last
    if top_p > 0:
        drop = vals.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop[:, -1] = False  # a tiny top_p would drop every survivor: the top token always stays
        vals = vals.masked_fill(drop, -torch.inf)
    probs = (vals / temp).softmax(dim=-1)
    noise = exponential_noise(logits, generator).gather(-1, idx)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    return idx.gather(-1, choice).view(B, l)


def sample_tokens(logits_BlV, top_k: int, top_p: float, temp: float, generator, fast=True):
    """One token per position (B, l): top-k, top-p, temperature, categorical draw."""
    if fast and 0 < top_k < logits_BlV.shape[-1]:
        return sample_top_k(logits_BlV, top_k, top_p, temp, generator)
    return sample_full(logits_BlV, top_k, top_p, temp, generator)


def smooth_embedding(logits_BlV, ratio: float, codebook_VC, generator):
    """--more_smooth: a Gumbel-softmax mixture of codebook vectors instead of the sampled token's
    (for visualisation only; never used for FID). Reads the filtered logits."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    gumbels = -exponential_noise(logits_BlV, generator).log()
    return ((logits_BlV.mul(1 + ratio) + gumbels) / tau).softmax(dim=-1) @ codebook_VC.unsqueeze(0)


def known_region(vae: VQVAE, images_B3HW, regenerate_B1HW):
    """What inpainting keeps: the input images' accumulated features after every scale and, at
    16x16, where they are kept (the complement of the region to regenerate, nearest-resized as the
    reference does). images in [-1, 1]; regenerate is 1 where new content is sampled.
    Returns the `known` argument of generate()."""
    with torch.autocast(images_B3HW.device.type, enabled=False):  # the nearest-codeword search needs one dtype
        _, f_hats = vae.encode(images_B3HW.float())
    side = vae.patch_nums[-1]
    keep = F.interpolate(1 - regenerate_B1HW.float(), size=(side, side), mode='nearest') > 0.5
    return f_hats, keep


def _per_scale(value, n):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    assert len(values) == n, f'expected 1 or {n} values, got {len(values)}'
    return values


@torch.inference_mode()
def generate(schedule: Sequence[Stage], vae: VQVAE, labels_B, *, seed: Optional[int], cfg: float,
             top_k=0, top_p=0.0, temp=1.0, more_smooth=False, known=None, generator=None,
             fast=True, on_scale=None):
    """Sample the token maps of all scales for the labels; returns (tokens (B, L), f_hat (B, Cvae, 16, 16)).

    top_k and temp are one value or one per scale. CFG strength grows linearly with the scale:
    logits = (1 + t) * cond - t * uncond, t = cfg * si / (S - 1).
    known = (f_hats, keep) pins the kept region of f_hat to an input image's features at every
    scale (inpainting; f_hats[si] is (B, Cvae, 16, 16), keep is a bool (B, 1, 16, 16)).
    fast=False runs the straightforward computation instead (the reference's growing cache, the
    class projections recomputed every scale, full-vocabulary sampling): same tokens, slower.
    on_scale(stage_index, si, prefill) is called after each scale (benchmark.py times scales with it).
    """
    patch_nums = vae.patch_nums
    S = len(patch_nums)
    top_k, temp = _per_scale(top_k, S), _per_scale(temp, S)
    device = labels_B.device
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
    B = labels_B.shape[0]
    codebook = vae.quantize.embedding.weight
    f_hat = torch.zeros(B, vae.Cvae, patch_nums[-1], patch_nums[-1], device=device)
    inputs = [None]   # inputs[si]: scale si's input in VQVAE space (B, pn*pn, Cvae); scale 0 starts from the class
    tokens = []
    first = 0
    for stage, (model, stop) in enumerate(schedule):
        if fast:
            cond = model.condition(labels_B)  # once per sample: class embedding and every AdaLN projection
            autocast = torch.is_autocast_enabled(device.type)
            cache = model.new_cache(2 * B, stop, torch.get_autocast_dtype(device.type) if autocast else cond.start.dtype, device)
        else:
            cache = GrowingKVCache(model.depth)
        for si in range(stop):
            if not fast:
                cond = model.condition(labels_B)  # the reference recomputes these every scale
            x = cond.start if si == 0 else model.embed_input(si, inputs[si])
            if si < first:  # prefill: a scale an earlier model decided; only this model's cache needs it
                model.step(si, x, cond, cache)
                if on_scale:
                    on_scale(stage, si, True)
                continue
            logits = model.step(si, x, cond, cache, cfg * (si / (S - 1)))
            idx_Bl = sample_tokens(logits, top_k[si], top_p, temp[si], generator, fast=fast and not more_smooth)
            tokens.append(idx_Bl)
            if more_smooth:
                h_BlC = smooth_embedding(logits, si / (S - 1), codebook, generator)
            else:
                h_BlC = vae.quantize.embedding(idx_Bl)
            pn = patch_nums[si]
            h_BChw = h_BlC.transpose(1, 2).reshape(B, vae.Cvae, pn, pn)
            nxt = vae.quantize.add_scale(si, f_hat, h_BChw, None if known is None else (known[0][si], known[1]))
            if nxt is not None:
                inputs.append(nxt.view(B, vae.Cvae, -1).transpose(1, 2))
            if on_scale:
                on_scale(stage, si, False)
            del logits, x  # not held through the next scale's forward (the 13x13 scale's logits: 177 MB at batch 64)
        del cache, cond  # free this model's cache before the next model allocates its own
        first = stop
    return torch.cat(tokens, dim=1), f_hat
