"""Independent computations for the tests, written from the parameters directly: a teacher-forced
pass of VAR over all 680 positions at once, and the VQVAE's multi-scale accumulation of tokens.
They share no code with models/ beyond the parameters, so a mistake there cannot cancel out here."""
import math

import numpy as np
import torch
import torch.nn.functional as F


def dense_forward(model, labels, inputs):
    """All 680 positions at once with a block-causal mask (a position sees its own scale and the
    coarser ones). inputs: scale 1..9's inputs in VQVAE space, each (B, pn*pn, Cvae).
    Returns every block's keys and values and the logits of both CFG halves (class, then no class)."""
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


def inputs_from_tokens(vae, tokens_BL):
    """VAR's inputs of scales 1..9 from the tokens of all scales, as the official quantiser makes
    them: codebook vector, bicubic to 16x16 (not the last scale), the scale's residual conv with
    ratio 0.5 (of 4 shared convs, the one whose tick in linspace(1/12, 11/12, 4) is nearest
    si / 9), summed; the next input is that sum area-resized to the next scale."""
    q = vae.quantize
    B, side, S = tokens_BL.shape[0], q.patch_nums[-1], len(q.patch_nums)
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    f_hat = torch.zeros(B, q.Cvae, side, side)
    inputs, begin = [], 0
    for si, pn in enumerate(q.patch_nums):
        h = q.embedding.weight[tokens_BL[:, begin:begin + pn * pn]].view(B, pn, pn, -1).permute(0, 3, 1, 2)
        begin += pn * pn
        if si < S - 1:
            h = F.interpolate(h, size=(side, side), mode='bicubic')
        conv = q.quant_resi.qresi_ls[int(np.argmin(np.abs(ticks - si / (S - 1))))]
        f_hat = f_hat + 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        if si < S - 1:
            nxt = q.patch_nums[si + 1]
            inputs.append(F.interpolate(f_hat, size=(nxt, nxt), mode='area').flatten(2).transpose(1, 2))
    return inputs, f_hat
