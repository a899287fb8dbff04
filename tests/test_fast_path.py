"""The fast path's pieces against the straightforward computation: the static cache holds what a
dense full-sequence pass computes, the cached per-scale logits equal that pass's, the fast path
samples the very tokens of the straightforward one, and per-sample work happens once."""
import copy

import pytest
import torch

from models import code_schedule, generate
from models.var import GrowingKVCache
from reference import dense_forward, inputs_from_tokens

LABELS = torch.tensor([5, 250, 999])


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
    held = 680 - 16 * 16  # the last scale's keys and values are read by no later scale: not kept
    assert cache.k.shape[3] == held
    for i in range(model.depth):
        torch.testing.assert_close(cache.k[i], keys[i][:, :, :held], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[i], values[i][:, :, :held], rtol=1e-5, atol=1e-5)
        assert torch.equal(cache.k[i], growing.k[i][:, :, :held]) and torch.equal(cache.v[i], growing.v[i][:, :, :held])


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


def test_per_scale_top_k_and_temperature_apply_to_their_own_scale(models):
    """top_k 1 makes a scale greedy: its tokens must be the argmax of the guided logits that an
    independent teacher-forced pass computes from the sampled tokens (the drafter's for scales
    before N, the refiner's after). Scales with top_k 0 sample the whole vocabulary, so some of
    their tokens are not the argmax. The final features are the tokens' own accumulation."""
    vae, drafter, refiner = models
    n, cfg, S = 3, 2.0, 10
    top_k = [0, 0, 1, 0, 0, 0, 1, 1, 0, 1]
    tokens, f_hat = generate(code_schedule(drafter, refiner, n), vae, LABELS, seed=4, cfg=cfg, top_k=top_k, top_p=0.0,
                             temp=[1.0] * 5 + [1e-3] + [1.0] * 4)  # a near-zero temperature is greedy too
    with torch.inference_mode():
        inputs, f_expected = inputs_from_tokens(vae, tokens)
        logits = {m: dense_forward(m, LABELS, inputs)[2] for m in (drafter, refiner)}
    torch.testing.assert_close(f_hat, f_expected, rtol=1e-4, atol=1e-4)
    B = len(LABELS)
    for si in range(S):
        begin, end = drafter.begin_ends[si]
        both = logits[drafter if si < n else refiner][:, begin:end]
        t = cfg * si / (S - 1)
        greedy = ((1 + t) * both[:B] - t * both[B:]).argmax(-1)
        if top_k[si] == 1 or si == 5:
            assert torch.equal(tokens[:, begin:end], greedy), si
        elif si >= 3:
            assert not torch.equal(tokens[:, begin:end], greedy), si


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
    """2 (K, V) x 2 (CFG) x batch x layers x positions x width x bytes, the positions being those a later
    scale of the same model reads: 8 scales hold 1+4+9+16+25+36+64 = 155 (the eighth scale's 10x10 are read by
    none), 10 hold 680 - 256 = 424, 1 holds none."""
    _, drafter, refiner = models
    B = 3
    assert drafter.new_cache(2 * B, 8, torch.float32, 'cpu').nbytes == 2 * 2 * B * 2 * 155 * 128 * 4
    assert refiner.new_cache(2 * B, 10, torch.float16, 'cpu').nbytes == 2 * 2 * B * 1 * 424 * 64 * 2
    assert drafter.new_cache(2 * B, 1, torch.float32, 'cpu').nbytes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason='host syncs can only be detected on a GPU')
def test_no_host_sync_inside_the_loop(models):
    vae, drafter, refiner = (copy.deepcopy(m).cuda() for m in models)  # copies: later tests use the CPU models
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


def test_weights_held_in_bf16_give_autocasts_logits_within_1e_2_of_fp32(models):
    """hold_weights_in(bf16) keeps in bf16 what autocast casts anyway: under autocast its logits are exactly
    those of the fp32 weights (autocast's per-call casts), and within 1e-2 relative error (norm-wise) of the
    fp32 logits. Embeddings, positions and the attention temperature stay fp32; fp32 changes nothing."""
    from models.var import hold_weights_in
    _, drafter, _ = models
    inputs = torch.randn(3, 679, 32, generator=torch.Generator().manual_seed(5))
    held = copy.deepcopy(drafter)
    assert hold_weights_in(held, torch.float32) is held and all(p.dtype == torch.float32 for p in held.parameters())
    hold_weights_in(held, torch.bfloat16)
    kept = {n for n, p in held.named_parameters() if p.dtype == torch.float32}
    assert kept == {'class_emb.weight', 'pos_start', 'pos_1LC', 'lvl_embed.weight'} | {f'blocks.{i}.attn.scale_mul_1H11' for i in range(2)}
    with torch.inference_mode():
        fp32 = drafter(LABELS, inputs)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            cast, bf16 = drafter(LABELS, inputs), held(LABELS, inputs)
    assert bf16.shape == fp32.shape == (3, 680, 4096) and torch.equal(bf16, cast)
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 1e-2


def test_a_decoder_held_in_bf16_decodes_what_autocast_decodes():
    """VQVAE.hold_decoder_in keeps the decoder's convolutions in bf16, the rest fp32: under autocast the images
    are exactly those of the fp32 decoder (a two-level decoder, 32x32 images: bf16 convolutions crawl on a CPU)."""
    from models import VQVAE
    torch.manual_seed(0)
    vae = VQVAE(ch=32, ch_mult=(1, 2)).eval()
    held = copy.deepcopy(vae).hold_decoder_in(torch.bfloat16)
    halves = {n.split('.')[0] for n, p in held.named_parameters() if p.dtype == torch.bfloat16}
    assert halves == {'decoder', 'post_quant_conv'} and held.decoder.norm_out.weight.dtype == torch.float32
    f_hat = torch.randn(2, 32, 16, 16)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(held.decode(f_hat), vae.decode(f_hat))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_on_a_gpu_held_weights_sample_what_autocast_samples(models):
    """On a GPU in fp16: the VAR weights held in fp16 (the scripts' way) sample the tokens that fp32 weights under
    fp16 autocast sample."""
    from models.var import hold_weights_in
    vae, drafter, refiner = (copy.deepcopy(m).cuda() for m in models)
    labels = LABELS.cuda()
    kw = dict(seed=0, cfg=1.5, top_k=600, top_p=0.96)
    with torch.inference_mode(), torch.autocast('cuda', dtype=torch.float16):
        cast, _ = generate(code_schedule(drafter, refiner, 8), vae, labels, **kw)
        for m in (drafter, refiner):
            hold_weights_in(m, torch.float16)
        held, _ = generate(code_schedule(drafter, refiner, 8), vae, labels, **kw)
    assert torch.equal(cast, held)
