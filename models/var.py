"""VAR: a GPT-style transformer that predicts the token map of each scale from all coarser ones.

Inference runs one scale at a time (`forward_scale`): the scale's tokens attend to themselves
and to every earlier scale through a KV cache. Everything that depends only on the class
label (the class embedding, every block's AdaLN scale/shift/gate, the head's AdaLN), and the
attention's bias and temperature, are computed once per run by `condition`, not once per scale.
Training (`forward`, teacher forcing) runs the same blocks over the known tokens of many scales at
once, a block-causal mask in place of the cache. Parameter names follow the
official checkpoints (var_d16.pth ... var_d30.pth, drafter_N.pth, refiner_N.pth).
"""
import itertools
import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .quant import PATCH_NUMS

MAX_SCALE_MUL = math.log(100)  # the attention temperature exp(scale_mul) is capped at 100


class KVCache:
    """Keys and values of every block, allocated once at the size the run needs and written in place.

    k, v: (depth, 2B, heads, positions, head_dim); both CFG halves share the batch dimension.
    positions: those a later scale of the same model reads, so not the last scale's (a model running
    all 10 scales holds 424 of the 680: the 16x16 scale's 256 would be 38% of the cache); that scale
    attends to the cached positions and its own, joined for the one block at work (see update).
    """
    attn_mask = None  # a scale sees every cached position

    def __init__(self, depth, batch, heads, positions, head_dim, dtype, device):
        shape = (depth, batch, heads, positions, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        if self.k.is_cuda:  # lets CUDA graphs (compile_steps) write into this cache rather than into a copy of it
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)

    @property
    def nbytes(self):
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, i, begin, end, k, v):
        """Store block i's keys and values of positions begin..end-1; return those of 0..end-1."""
        if end > self.k.shape[3]:  # the last scale: nothing reads it later, so it is joined, not stored
            # (in the cache's dtype: under CUDA autocast the normalised keys come in fp32)
            return (torch.cat((self.k[i, :, :, :begin], k.to(self.k.dtype)), dim=2),
                    torch.cat((self.v[i, :, :, :begin], v.to(self.v.dtype)), dim=2))
        self.k[i, :, :, begin:end] = k
        self.v[i, :, :, begin:end] = v
        return self.k[i, :, :, :end], self.v[i, :, :, :end]


class GrowingKVCache:
    """The reference's cache, kept as the baseline that benchmark.py and the tests compare with:
    every scale concatenates, copying the whole cache (and holding two copies at the peak)."""

    attn_mask = None

    def __init__(self, depth):
        self.k, self.v = [None] * depth, [None] * depth

    @property
    def nbytes(self):
        return sum(2 * t.numel() * t.element_size() for t in self.k if t is not None)

    def update(self, i, begin, end, k, v):
        self.k[i] = k if self.k[i] is None else torch.cat((self.k[i], k), dim=2)
        self.v[i] = v if self.v[i] is None else torch.cat((self.v[i], v), dim=2)
        return self.k[i], self.v[i]


class BlockCausal:
    """Teacher forcing: no cache, all positions 0..end-1 run at once; each attends to its own scale
    and the coarser ones, exactly what the KV cache lets it see when sampling."""

    def __init__(self, level_L):
        self.attn_mask = level_L[:, None] >= level_L[None, :]  # True = may attend

    def update(self, i, begin, end, k, v):
        return k, v


class SelfAttention(nn.Module):
    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def constants(self):
        """The qkv bias (keys have none) and the per-head temperature: fixed for a run, made once."""
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return bias, self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()

    def forward(self, x, constants, cache, i, begin, end):
        """x (2B, l, C) holds the positions begin..end-1; they attend to positions 0..end-1 through block i's cache."""
        B2, L, C = x.shape
        bias, q_scale = constants
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(B2, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # cosine attention: unit q and k, a learned per-head temperature instead of 1/sqrt(d). (CUDA autocast
        # normalises in fp32: the fp32 copies are made and dropped here, not held through the attention.)
        k_all, v_all = cache.update(i, begin, end, F.normalize(k, dim=-1), v)
        q = F.normalize(q, dim=-1).mul(q_scale).to(k_all.dtype)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=cache.attn_mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B2, L, C))


class FFN(nn.Module):
    def __init__(self, embed_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class Block(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the class (AdaLN)."""

    def __init__(self, embed_dim, num_heads, mlp_ratio, norm_eps):
        super().__init__()
        self.C = embed_dim
        self.attn = SelfAttention(embed_dim, num_heads)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def constants(self, cond_BD):
        """Everything fixed for a run: the class-conditioned AdaLN gates, scales (+1) and shifts, and
        the attention's constants."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        return (gamma1, gamma2, scale1.add(1), scale2.add(1), shift1, shift2), self.attn.constants()

    def forward(self, x, constants, cache, i, begin, end, keep=None):
        """keep: training's drop path, (2, B) per-sample factors of the two residual branches (0: dropped)."""
        if isinstance(constants, torch.Tensor):  # training passes the class embedding: made here, where FSDP2 has gathered this block
            constants = self.constants(constants)
        (gamma1, gamma2, scale1, scale2, shift1, shift2), attn_constants = constants
        a = self.attn(self.ln(x).mul(scale1).add_(shift1), attn_constants, cache, i, begin, end).mul_(gamma1)
        x = x + (a if keep is None else a * keep[0].to(a.dtype).view(-1, 1, 1))
        f = self.ffn(self.ln(x).mul(scale2).add_(shift2)).mul(gamma2)
        return x + (f if keep is None else f * keep[1].to(f.dtype).view(-1, 1, 1))


class HeadNorm(nn.Module):
    def __init__(self, embed_dim, norm_eps):
        super().__init__()
        self.C = embed_dim
        self.ln = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim))

    def modulation(self, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return scale.add(1), shift

    def forward(self, x, modulation):
        scale, shift = modulation
        return self.ln(x).mul(scale).add_(shift)


@dataclass
class Condition:
    """What is fixed for a whole run of one model: what the labels decide (both CFG halves) and the
    attention's weight-only constants."""
    start: torch.Tensor                     # (2B, 1, C): scale 0's input
    blocks: List[Tuple]                     # per block: its AdaLN modulation and attention constants (Block.constants)
    head: Tuple[torch.Tensor, torch.Tensor]  # 1+scale, shift of the head's AdaLN


class VAR(nn.Module):
    def __init__(self, depth=16, embed_dim=1024, num_heads=16, num_classes=1000, vocab_size=4096, Cvae=32,
                 mlp_ratio=4.0, norm_eps=1e-6, patch_nums=PATCH_NUMS):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.config = dict(depth=depth, embed_dim=embed_dim, num_heads=num_heads, num_classes=num_classes,
                           vocab_size=vocab_size, Cvae=Cvae, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                           patch_nums=tuple(patch_nums))
        self.depth, self.C, self.num_heads, self.num_classes = depth, embed_dim, num_heads, num_classes
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        # begin_ends[si]: the positions of scale si in the 680-long sequence
        ends = list(itertools.accumulate(pn * pn for pn in self.patch_nums))
        self.begin_ends = [(e - pn * pn, e) for e, pn in zip(ends, self.patch_nums)]

        self.word_embed = nn.Linear(Cvae, embed_dim)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)  # the last row is "no class" (CFG)
        self.pos_start = nn.Parameter(torch.zeros(1, self.patch_nums[0] ** 2, embed_dim))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, embed_dim))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth))
        self.head_nm = HeadNorm(embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, vocab_size)

    def derived_buffer_shapes(self):
        """Buffers of the official checkpoints that this model derives instead of loading:
        the scale index of each position, the training-time block-causal mask, and the
        keys' all-zero bias."""
        shapes = {'lvl_1L': (1, self.L), 'attn_bias_for_masking': (1, 1, self.L, self.L)}
        shapes.update({f'blocks.{i}.attn.zero_k_bias': (self.C,) for i in range(self.depth)})
        return shapes

    def condition(self, labels_B) -> Condition:
        uncond = torch.full_like(labels_B, self.num_classes)
        cond_BD = self.class_emb(torch.cat((labels_B, uncond)))
        return Condition(self.start(cond_BD), [b.constants(cond_BD) for b in self.blocks], self.head_nm.modulation(cond_BD))

    def start(self, cond_BD):
        """Scale 0's input: the class embedding at the start position."""
        return cond_BD.unsqueeze(1) + self.pos_start.expand(cond_BD.shape[0], -1, -1) + self.level_position(0)

    def level_position(self, si):
        """Level (scale) embedding plus absolute position embedding of scale si's positions: (1, pn*pn, C)."""
        begin, end = self.begin_ends[si]
        return self.lvl_embed.weight[si] + self.pos_1LC[:, begin:end]

    def embed_input(self, si, x_BlCvae):
        """The input of scale si >= 1 from the VQVAE's features (B, pn*pn, Cvae), for both CFG halves."""
        return (self.word_embed(x_BlCvae) + self.level_position(si)).repeat(2, 1, 1)

    def scale_index(self, end):
        """(end,) the scale of each position 0..end-1."""
        return torch.cat([torch.full((e - b,), si) for si, (b, e) in enumerate(self.begin_ends)])[:end]

    def forward(self, labels_B, inputs_BLCvae, num_scales=None, head_begin=0, grad_ckpt=False, keep=None):
        """Teacher forcing: the class-conditional logits (B, l - head_begin, V) of positions
        head_begin..l-1, l the positions of the first num_scales scales (default all), from the
        labels and the VQVAE inputs of scales 1.. (B, >= l - 1, Cvae; see
        MultiScaleQuantizer.teacher_inputs). One pass over all l positions through the blocks and
        head sampling uses; no guidance half, so a "no class" row is simply the label num_classes.
        head_begin spares the head (B x positions x 4096 logits) the positions a loss ignores. keep
        (depth, 2, B): drop path (stochastic depth) as VAR trains, applied in train mode only."""
        num_scales = num_scales or len(self.patch_nums)
        end = self.begin_ends[num_scales - 1][1]
        first = self.begin_ends[0][1]
        cond_BD = self.class_emb(labels_B)
        # word_embed runs even on an empty input (one scale) so that every parameter takes part (DDP)
        rest = self.word_embed(inputs_BLCvae[:, :end - first])
        if num_scales > 1:
            rest = rest + torch.cat([self.level_position(si) for si in range(1, num_scales)], dim=1)
        x = torch.cat((self.start(cond_BD), rest), dim=1)
        mask = BlockCausal(self.scale_index(end).to(x.device))
        keep = keep if self.training and keep is not None else [None] * self.depth
        for i, block in enumerate(self.blocks):
            if grad_ckpt:  # keep only each block's input; recompute the inside during backward
                x = torch.utils.checkpoint.checkpoint(block, x, cond_BD, mask, i, 0, end, keep[i], use_reentrant=False)
            else:
                x = block(x, cond_BD, mask, i, 0, end, keep[i])
        return self.head_logits(x[:, head_begin:], self.head_nm.modulation(cond_BD))

    def new_cache(self, batch2, num_scales, dtype, device) -> KVCache:
        """A cache for both CFG halves of a run over the first num_scales scales: the positions of all
        but the last of them, the only ones a later scale reads."""
        positions = self.begin_ends[num_scales - 1][0]
        return KVCache(self.depth, batch2, self.num_heads, positions, self.C // self.num_heads, dtype, device)

    def forward_scale(self, si, x, cond: Condition, cache):
        """Run scale si's input (2B, pn*pn, C) through every block; returns the hidden states."""
        begin, end = self.begin_ends[si]
        for i, block in enumerate(self.blocks):
            x = block(x, cond.blocks[i], cache, i, begin, end)
        return x

    def logits(self, h, cond: Condition):
        """(2B, l, V) logits of both CFG halves, in the autocast precision under autocast (fp32 otherwise)."""
        return self.head_logits(h, cond.head, fp32=False)

    def head_logits(self, h, head_modulation, fp32=True):
        logits = self.head(self.head_nm(h.float(), head_modulation).float())
        return logits.float() if fp32 else logits

    def step(self, si, x, cond: Condition, cache, cfg_t=None):
        """One fixed-shape scale: blocks, head and guidance, (B, pn*pn, V) fp32 logits; cfg_t None = prefill
        (fill the cache only). This is the unit compile() captures, one graph per scale."""
        h = self.forward_scale(si, x, cond, cache)
        if cfg_t is None:
            return None
        logits = self.logits(h, cond)
        B = logits.shape[0] // 2
        # guidance (1 + t) * cond - t * uncond in fp32, as the reference computes it (t up to 4 would scale the
        # rounding of half-precision logits by 9), from the half logits one half at a time: no fp32 copy of
        # both halves (537 MB at the last scale, batch 64). In fp32 .float() is a view: the in-place mul_
        # then writes into the logits, which nothing reads afterwards.
        guided = logits[:B].float() * (1 + cfg_t)
        return guided.sub_(logits[B:].float().mul_(cfg_t))


def hold_weights_in(model: VAR, dtype):
    """Hold the weights of every linear layer (and the attention's q and v biases, the qkv layer's bias)
    in dtype, the autocast precision. Autocast casts them to it at every call anyway, and, the models
    being frozen, keeps no cast copy: held in dtype they give the same results, take half the memory
    and are not cast at every scale. What stays fp32 is what autocast leaves in fp32: the class,
    position and level embeddings, which start the residual stream (kept in fp32 between the blocks,
    as under autocast), and the attention temperature, exponentiated in fp32 (under 0.2% of the weights).
    fp32 is a no-op: the parity path."""
    if dtype == torch.float32:
        return model
    linear = [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
    for p in linear + [p for b in model.blocks for p in (b.attn.q_bias, b.attn.v_bias)]:
        p.data = p.data.to(dtype)  # in place of Module.to, which cannot swap fake tensors (utils/simulate.py)
    return model


def compile_steps(model: VAR):
    """Compile model.step with CUDA graphs (torch.compile mode='reduce-overhead'): every scale has
    fixed shapes, so each (scale, batch size) is captured once and replayed without launch overhead."""
    if getattr(model, 'compiled', False):
        return model
    # one graph per (model, scale, prefill or not, batch size, cache size): far more than the default 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
    model.step = torch.compile(model.step, mode='reduce-overhead', fullgraph=True, dynamic=False)
    model.compiled = True
    return model
