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

from .var import VAR
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
    """Top-k then top-p (nucleus) filtering, in place, as the reference does; 0 switches a filter off.

    Top-k keeps every logit >= the k-th largest (ties kept). Top-p sorts what is left ascending and
    drops the longest prefix whose probability mass is <= 1 - top_p, always keeping the top token.
    """
    if top_k > 0:
        kth = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_BlV.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    return logits_BlV


def sample_from_probs(probs_NV, generator):
    """One categorical sample per row, drawn exactly as torch.multinomial(probs, 1) draws it:
    argmax(p / q) with q ~ Exp(1), one draw per vocabulary entry. Written out so that no host
    sync happens (multinomial checks its input with .item()); the stream use depends only on
    the shape, which is what lets a refiner continue the drafter's generator."""
    q = torch.empty_like(probs_NV).exponential_(generator=generator)
    return (probs_NV / q).argmax(dim=-1)


def sample_tokens(logits_BlV, top_k: int, top_p: float, temp: float, generator):
    """Filtered, tempered sampling of one token per position; returns tokens (B, l).
    logits_BlV is filtered in place (more_smooth reads the filtered logits)."""
    B, l, V = logits_BlV.shape
    filter_logits_(logits_BlV, top_k, top_p)
    probs = (logits_BlV / temp).softmax(dim=-1).view(-1, V)
    return sample_from_probs(probs, generator).view(B, l)


def smooth_embedding(logits_BlV, ratio: float, codebook_VC, generator):
    """--more_smooth: a Gumbel-softmax mixture of codebook vectors instead of the sampled token's
    (for visualisation only; never used for FID)."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    gumbels = -torch.empty_like(logits_BlV).exponential_(generator=generator).log()
    return ((logits_BlV.mul(1 + ratio) + gumbels) / tau).softmax(dim=-1) @ codebook_VC.unsqueeze(0)


def _per_scale(value, n):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    assert len(values) == n, f'expected 1 or {n} values, got {len(values)}'
    return values


@torch.inference_mode()
def generate(schedule: Sequence[Stage], vae: VQVAE, labels_B, *, seed: Optional[int], cfg: float,
             top_k=0, top_p=0.0, temp=1.0, more_smooth=False, known=None, generator=None):
    """Sample the token maps of all scales for the labels; returns (tokens (B, L), f_hat (B, Cvae, 16, 16)).

    top_k and temp are one value or one per scale. CFG strength grows linearly with the scale:
    logits = (1 + t) * cond - t * uncond, t = cfg * si / (S - 1).
    known = (f_hats, keep) pins the kept region of f_hat to an input image's features at every
    scale (inpainting; f_hats[si] is (B, Cvae, 16, 16), keep is a bool (B, 1, 16, 16)).
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
    for model, stop in schedule:
        cond = model.condition(labels_B)
        cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else cond.start.dtype
        cache = model.new_cache(2 * B, stop, cache_dtype, device)
        for si in range(stop):
            x = cond.start if si == 0 else model.embed_input(si, inputs[si])
            h = model.forward_scale(si, x, cond, cache)
            if si < first:
                continue  # prefill: these scales were decided by an earlier model
            logits = model.logits(h, cond)
            t = cfg * (si / (S - 1))
            logits = (1 + t) * logits[:B] - t * logits[B:]
            idx_Bl = sample_tokens(logits, top_k[si], top_p, temp[si], generator)
            tokens.append(idx_Bl)
            pn = patch_nums[si]
            if more_smooth:
                h_BlC = smooth_embedding(logits, si / (S - 1), codebook, generator)
            else:
                h_BlC = vae.quantize.embedding(idx_Bl)
            h_BChw = h_BlC.transpose(1, 2).reshape(B, vae.Cvae, pn, pn)
            nxt = vae.quantize.add_scale(si, f_hat, h_BChw, None if known is None else (known[0][si], known[1]))
            if nxt is not None:
                inputs.append(nxt.view(B, vae.Cvae, -1).transpose(1, 2))
        del cache, cond  # free this model's cache before the next model allocates its own
        first = stop
    return torch.cat(tokens, dim=1), f_hat
