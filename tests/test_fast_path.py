"""The fast path's pieces against the straightforward computation: the static cache holds what a
dense full-sequence pass computes, the cached per-scale logits equal that pass's, the fast path
samples the very tokens of the straightforward one, and per-sample work happens once."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import code_schedule, generate
from models.var import GrowingKVCache

LABELS = torch.tensor([5, 250, 999])


def dense_forward(model, labels, inputs):
    """An independent, teacher-forced pass over all 680 positions at once with a block-causal mask
    (a position sees its own scale and the coarser ones), written from the parameters directly.
    Returns every block's keys and values and the logits of both CFG halves."""
    B = labels.shape[0]
    cond = model.class_emb(torch.cat((labels, torch.full_like(labels, model.num_classes))))
    level = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(model.patch_nums)])
    pos = model.lvl_embed.weight[level] + model.pos_1LC[0]
    x = torch.cat([cond[:, None] + model.pos_start[0]] +
                  [model.word_embed(torch.cat(inputs, dim=1)).repeat(2, 1, 1)], dim=1) + pos
    mask = level[:, None] >= level[None, :]
    keys, values = [], []
    for blk in model.blocks:
        g1, g2, s1, s2, b1, b2 = (F.linear(F.silu(cond), blk.ada_lin[1].weight, blk.ada_lin[1].bias)
                                  .view(2 * B, 1, 6, model.C).unbind(2))
        a = F.layer_norm(x, (model.C,), eps=1e-6) * (1 + s1) + b1
        at = blk.attn
        qkv = a @ at.mat_qkv.weight.T + torch.cat((at.q_bias, torch.zeros_like(at.q_bias), at.v_bias))
        q, k, v = qkv.view(2 * B, -1, 3, model.num_heads, model.C // model.num_heads).permute(2, 0, 3, 1, 4)
        q = q / q.norm(dim=-1, keepdim=True) * at.scale_mul_1H11.clamp(max=math.log(100)).exp()
        k = k / k.norm(dim=-1, keepdim=True)
        w = (q @ k.transpose(-1, -2)).masked_fill(~mask, -math.inf).softmax(-1)
        o = (w @ v).transpose(1, 2).reshape(2 * B, -1, model.C)
        x = x + at.proj(o) * g1
        f = F.layer_norm(x, (model.C,), eps=1e-6) * (1 + s2) + b2
        x = x + blk.ffn.fc2(F.gelu(blk.ffn.fc1(f), approximate='tanh')) * g2
        keys.append(k)
        values.append(v)
    s, b = F.linear(F.silu(cond), model.head_nm.ada_lin[1].weight, model.head_nm.ada_lin[1].bias).view(2 * B, 1, 2, model.C).unbind(2)
    logits = model.head(F.layer_norm(x, (model.C,), eps=1e-6) * (1 + s) + b)
    return keys, values, logits


@pytest.mark.parametrize('which', ['drafter', 'refiner'])
def test_cache_and_logits_equal_a_dense_full_sequence_pass(models, which):
    vae, drafter, refiner = models
    model = drafter if which == 'drafter' else refiner
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(3, pn * pn, vae.Cvae, generator=g) for pn in model.patch_nums[1:]]
    with torch.inference_mode():
        keys, values, dense_logits = dense_forward(model, LABELS, inputs)
        cond = model.condition(LABELS)
        cache = model.new_cache(6, 10, torch.float32, 'cpu')
        growing = GrowingKVCache(model.depth)
        for si in range(10):
            x = cond.start if si == 0 else model.embed_input(si, inputs[si - 1])
            logits = model.logits(model.forward_scale(si, x, cond, cache), cond)
            model.forward_scale(si, x, cond, growing)
            begin, end = model.begin_ends[si]
            torch.testing.assert_close(logits, dense_logits[:, begin:end], rtol=1e-4, atol=1e-4)
    for i in range(model.depth):
        torch.testing.assert_close(cache.k[i], keys[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[i], values[i], rtol=1e-5, atol=1e-5)
        assert torch.equal(cache.k[i], growing.k[i]) and torch.equal(cache.v[i], growing.v[i])


SETTINGS = [
    dict(n=10, cfg=4.0, top_k=900, top_p=0.95, temp=1.0),
    dict(n=8, cfg=1.5, top_k=600, top_p=0.96, temp=[1.1] * 7 + [1.0] * 3),
    dict(n=3, cfg=2.5, top_k=[50] * 5 + [4096] * 5, top_p=0.0, temp=0.9),
    dict(n=6, cfg=0.0, top_k=0, top_p=0.8, temp=1.2),
]


@pytest.mark.parametrize('setting', SETTINGS, ids=[str(s['n']) for s in SETTINGS])
def test_fast_path_samples_what_the_straightforward_path_samples(models, setting):
    vae, drafter, refiner = models
    setting = dict(setting)
    schedule = code_schedule(drafter, refiner, setting.pop('n'))
    fast, f_fast = generate(schedule, vae, LABELS, seed=123, fast=True, **setting)
    slow, f_slow = generate(schedule, vae, LABELS, seed=123, fast=False, **setting)
    assert torch.equal(fast, slow)
    torch.testing.assert_close(f_fast, f_slow, rtol=0, atol=1e-6)


def test_class_projections_are_computed_once_per_sample(models):
    """Every AdaLN projection runs once per model per call in the fast path, and once per scale the
    model runs in the straightforward one (as in the reference)."""
    vae, drafter, refiner = models
    calls = []
    hooks = [m.register_forward_hook(lambda *a, name=name: calls.append(name))
             for name, m in list(drafter.named_modules()) + list(refiner.named_modules()) if name.endswith('ada_lin')]
    try:
        generate(code_schedule(drafter, refiner, 8), vae, LABELS, seed=0, cfg=1.5, top_k=600, top_p=0.96)
        fast = len(calls)
        calls.clear()
        generate(code_schedule(drafter, refiner, 8), vae, LABELS, seed=0, cfg=1.5, top_k=600, top_p=0.96, fast=False)
        slow = len(calls)
    finally:
        for h in hooks:
            h.remove()
    # every block plus the head; the drafter runs scales 0-7, the refiner 0-9 (prefill included)
    assert fast == (drafter.depth + 1) + (refiner.depth + 1)
    assert slow == 8 * (drafter.depth + 1) + 10 * (refiner.depth + 1)


def test_kv_cache_size_is_what_the_model_needs(models):
    """2 (K, V) x 2 (CFG) x batch x layers x positions x width x bytes."""
    _, drafter, refiner = models
    B = 3
    assert drafter.new_cache(2 * B, 8, torch.float32, 'cpu').nbytes == 2 * 2 * B * 2 * 255 * 128 * 4
    assert refiner.new_cache(2 * B, 10, torch.float16, 'cpu').nbytes == 2 * 2 * B * 1 * 680 * 64 * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason='host syncs can only be detected on a GPU')
def test_no_host_sync_inside_the_loop(models):
    vae, drafter, refiner = (m.cuda() for m in models)
    labels = LABELS.cuda()
    generate(code_schedule(drafter, refiner, 8), vae, labels, seed=0, cfg=1.5, top_k=600, top_p=0.96)  # warm-up
    torch.cuda.set_sync_debug_mode('error')
    try:
        generate(code_schedule(drafter, refiner, 8), vae, labels, seed=0, cfg=1.5, top_k=600, top_p=0.96)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_the_half_precision_path_runs_under_autocast(models, monkeypatch):
    """The GPU default (fp16/bf16 autocast), exercised on the CPU in bf16: caches are held in bf16,
    plain, smoothed and inpainting runs sample valid tokens, and inpainting still pins the kept
    features exactly (the encoder runs in fp32 inside)."""
    from models import var as var_module
    from models.sampling import known_region
    vae, drafter, refiner = models
    dtypes = []
    original = var_module.KVCache.__init__
    monkeypatch.setattr(var_module.KVCache, '__init__', lambda self, *a: (original(self, *a), dtypes.append(self.k.dtype))[0])
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    region = torch.zeros(2, 1, 256, 256)
    region[..., 64:192, 64:192] = 1
    kw = dict(seed=0, cfg=1.5, top_k=600, top_p=0.96)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        known = known_region(vae, x, region)
        for extra in (dict(), dict(more_smooth=True), dict(known=known)):
            tokens, f_hat = generate(code_schedule(drafter, refiner, 8), vae, LABELS[:2], **kw, **extra)
            assert tokens.shape == (2, 680) and 0 <= tokens.min() and tokens.max() < 4096
            assert f_hat.dtype == torch.float32 and torch.isfinite(f_hat).all()
    keep = known[1].expand_as(f_hat)
    assert torch.equal(f_hat[keep], known[0][-1][keep])
    assert set(dtypes) == {torch.bfloat16}
