"""The sampling step and the schedule, against hand-worked numbers and independent computations."""
import math

import pytest
import torch

from models import Stage, code_schedule, generate
from models.sampling import filter_logits_, sample_full, sample_tokens, sample_top_k

NEG = -math.inf


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 2.0, 0.0]]])
    filter_logits_(logits, top_k=2, top_p=0)
    assert logits.tolist() == [[[NEG, NEG, 2.0, 3.0], [NEG, 2.0, 2.0, NEG]]]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # probabilities .1 .4 .2 .3: ascending cumulative mass .1 .3 .6 1.0; with top_p .65 the tokens
    # whose cumulative mass is <= .35 go (.1 and .2), leaving .3 + .4 = .7 >= .65
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = probs.log().view(1, 1, 4).clone()
    filter_logits_(logits, top_k=0, top_p=0.65)
    assert torch.isinf(logits[0, 0]).tolist() == [True, False, True, False]


def test_the_most_likely_token_survives_a_top_p_that_drops_everything():
    """With top_p 1e-9 (1.0 - 1e-9 rounds to 1.0 in float32) the cumulative test drops every token
    of a row whose probabilities sum to at most 1: the guard must keep the top one, in the filter
    and in both samplers, so every draw is the argmax."""
    logits = torch.randn(4, 64, 4096, generator=torch.Generator().manual_seed(0)) * 3
    filtered = filter_logits_(logits.clone(), top_k=0, top_p=1e-9)
    kept = torch.isfinite(filtered)
    assert kept.sum(-1).max() == 1 and torch.equal(kept.float().argmax(-1), logits.argmax(-1))
    for top_k in (0, 600):
        for sampler in (sample_full, sample_top_k):
            if sampler is sample_top_k and top_k == 0:
                continue
            tokens = sampler(logits.clone(), top_k, 1e-9, 1.0, torch.Generator().manual_seed(1))
            assert torch.equal(tokens, logits.argmax(-1)), (sampler.__name__, top_k)


def test_zero_switches_both_filters_off():
    logits = torch.randn(2, 3, 50)
    before = logits.clone()
    filter_logits_(logits, top_k=0, top_p=0)
    assert torch.equal(logits, before)


def test_draws_are_torch_multinomials_and_use_the_stream_the_same_way():
    """Our sync-free draw must pick what torch.multinomial picks and leave the generator where it
    leaves it: that is what reproduces the reference and lets a refiner continue its stream."""
    logits = torch.randn(2, 32, 4096) * 3
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for top_k, top_p, temp in ((0, 0.0, 1.0), (600, 0.95, 1.1), (0, 0.5, 0.8)):
        ours = sample_full(logits.clone(), top_k, top_p, temp, g1)
        probs = (filter_logits_(logits.clone(), top_k, top_p) / temp).softmax(-1).view(-1, 4096)
        theirs = torch.multinomial(probs, 1, generator=g2).view(2, 32)
        assert torch.equal(ours, theirs)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize('top_k,top_p,temp', [(1, 0.0, 1.0), (50, 0.0, 1.0), (600, 0.95, 1.1), (900, 0.96, 1.0),
                                              (600, 0.3, 0.7), (4000, 0.99, 1.3)])
def test_sampling_on_the_top_k_survivors_equals_the_full_vocabulary(top_k, top_p, temp):
    """The fast sampler must draw the very tokens the straightforward one draws, and leave the
    generator in the same state."""
    logits = torch.randn(3, 200, 4096) * 4
    g_fast, g_full = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(2):
        fast = sample_top_k(logits.clone(), top_k, top_p, temp, g_fast)
        full = sample_full(logits.clone(), top_k, top_p, temp, g_full)
        assert torch.equal(fast, full)
    assert torch.equal(g_fast.get_state(), g_full.get_state())


def test_frequencies_follow_the_tempered_filtered_distribution():
    # logits log 1, log 3, log 6 with top_k 2 leaves 3 : 6; temperature 2 makes it sqrt(3) : sqrt(6)
    logits = torch.tensor([1.0, 3.0, 6.0]).log().expand(1, 40000, 3).clone()
    tokens = sample_tokens(logits, top_k=2, top_p=0, temp=2.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens.flatten(), minlength=3).float() / tokens.numel()
    p2 = math.sqrt(6) / (math.sqrt(3) + math.sqrt(6))
    assert freq[0] == 0
    assert abs(freq[2].item() - p2) < 0.01  # 5 standard deviations


def test_a_handoff_to_the_same_model_changes_nothing(models):
    """Prefill plus the continued generator must make a change of model invisible: a 'CoDe' whose
    refiner is the drafter samples exactly what the drafter alone samples."""
    vae, drafter, _ = models
    labels = torch.tensor([3, 141])
    kw = dict(seed=7, cfg=3.0, top_k=100, top_p=0.9, temp=1.05)
    alone, f_alone = generate([Stage(drafter, 10)], vae, labels, **kw)
    for n in (1, 5, 9):
        split, f_split = generate(code_schedule(drafter, drafter, n), vae, labels, **kw)
        assert torch.equal(alone, split), n
        assert torch.equal(f_alone, f_split)


def test_draft_steps_ten_is_the_drafter_alone(models):
    vae, drafter, refiner = models
    assert code_schedule(drafter, refiner, 10) == [Stage(drafter, 10)]
    assert code_schedule(drafter, refiner, 6) == [Stage(drafter, 6), Stage(refiner, 10)]


def test_each_model_caches_only_the_positions_it_needs(models, monkeypatch):
    """Drafter: the positions of its first N - 1 scales (its N-th is read by no later scale of its own);
    refiner: 680 - 256, all but the last scale's; both CFG halves; never two at once."""
    vae, drafter, refiner = models
    from models import var as var_module
    made, alive = [], []
    original = var_module.KVCache.__init__

    def record(self, depth, batch, heads, positions, head_dim, dtype, device):
        original(self, depth, batch, heads, positions, head_dim, dtype, device)
        import weakref
        alive[:] = [r for r in alive if r() is not None]
        made.append((depth, batch, positions, heads * head_dim, len(alive)))
        alive.append(weakref.ref(self))

    monkeypatch.setattr(var_module.KVCache, '__init__', record)
    generate(code_schedule(drafter, refiner, 8), vae, torch.tensor([1, 2, 3]), seed=0, cfg=1.5, top_k=600, top_p=0.96)
    assert made == [(2, 6, 155, 128, 0), (1, 6, 424, 64, 0)]


def test_cfg_zero_ignores_the_unconditional_half(models):
    """With cfg 0 the guidance term vanishes, so the 'no class' embedding cannot matter; with cfg > 0 it does."""
    vae, drafter, _ = models
    labels = torch.tensor([7])
    sample = lambda cfg: generate([Stage(drafter, 10)], vae, labels, seed=1, cfg=cfg, top_k=0, top_p=0)[0]
    plain, guided = sample(0.0), sample(2.0)
    saved = drafter.class_emb.weight[-1].clone()
    try:
        drafter.class_emb.weight[-1].fill_(50.0)
        plain_after, guided_after = sample(0.0), sample(2.0)
    finally:
        drafter.class_emb.weight[-1].copy_(saved)
    assert torch.equal(plain, plain_after)
    assert not torch.equal(guided, guided_after)
