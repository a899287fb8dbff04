"""VAR's multi-scale VQVAE: a conv encoder/decoder (the latent-diffusion vq-f16 design) around
the multi-scale quantiser. Module names follow the official checkpoint vae_ch160v4096z32.pth."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import PATCH_NUMS, MultiScaleQuantizer

DECODE_CHUNK = 8  # images decoded at once (VQVAE.decode)


def group_norm(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, C, H * W).transpose(2, 3).unbind(1)  # each B, HW, C
        h = F.scaled_dot_product_attention(q, k, v)  # scale C ** -0.5, as the reference's bmm
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as trained


class Upsample2x(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


def _level(blocks, attns, resample_name=None, resample=None):
    """One resolution of the encoder or decoder: residual blocks, their attentions, a resampling."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        setattr(level, resample_name, resample)
    return level


def _run_level(level, h):
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    resample = getattr(level, 'downsample', None) or getattr(level, 'upsample', None)
    return h if resample is None else resample(h)


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, z_channels, num_res_blocks=2):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            top = i == len(ch_mult) - 1
            self.down.append(_level([ResnetBlock(c_in if j == 0 else ch * mult, ch * mult) for j in range(num_res_blocks)],
                                    [AttnBlock(ch * mult) for _ in range(num_res_blocks if top else 0)],
                                    'downsample', None if top else Downsample2x(ch * mult)))
            c_in = ch * mult
        self.mid = _mid(c_in)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, z_channels, num_res_blocks=2):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, 1, 1)
        self.mid = _mid(c_in)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built top-down, stored by level index
            c_out = ch * ch_mult[i]
            levels.insert(0, _level([ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks + 1)],
                                    [AttnBlock(c_out) for _ in range(num_res_blocks + 1 if i == len(ch_mult) - 1 else 0)],
                                    'upsample', Upsample2x(c_out) if i != 0 else None))
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _mid(channels):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)
    return mid


class VQVAE(nn.Module):
    # Buffers the official checkpoint holds that inference never reads (a training statistic);
    # the loader checks their shape and drops them, see utils/checkpoints.py.
    UNUSED_BUFFERS = ('quantize.ema_vocab_hit_SV',)

    def __init__(self, vocab_size=4096, Cvae=32, ch=160, ch_mult=(1, 1, 2, 2, 4), share_quant_resi=4,
                 patch_nums=PATCH_NUMS):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, Cvae=Cvae, ch=ch, ch_mult=tuple(ch_mult),
                           share_quant_resi=share_quant_resi, patch_nums=tuple(patch_nums))
        self.vocab_size, self.Cvae, self.patch_nums = vocab_size, Cvae, tuple(patch_nums)
        self.encoder = Encoder(ch, ch_mult, Cvae)
        self.decoder = Decoder(ch, ch_mult, Cvae)
        self.quantize = MultiScaleQuantizer(vocab_size, Cvae, patch_nums, share_quant_resi)
        self.quant_conv = nn.Conv2d(Cvae, Cvae, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(Cvae, Cvae, 3, 1, 1)

    def derived_buffer_shapes(self):
        return {'quantize.ema_vocab_hit_SV': (len(self.patch_nums), self.vocab_size)}

    def decode(self, f_hat, chunk=DECODE_CHUNK):
        """Accumulated features (B, Cvae, 16, 16) -> images (B, 3, 256, 256) in [0, 1], at most chunk
        images at a time (None: all at once). The decoder's 256x256 activations take about 140 MB per
        image in half precision (simulated), more than a sampling step needs per image: decoded whole,
        a batch of 64 would set the run's peak memory with them."""
        if chunk is None or f_hat.shape[0] <= chunk:
            return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1).add_(1).mul_(0.5)
        return torch.cat([self.decode(part, None) for part in f_hat.split(chunk)])

    def hold_decoder_in(self, dtype):
        """Hold the decoder's convolutions (and post_quant_conv's) in dtype, the autocast precision the decode runs
        in: autocast casts them to it at every call anyway, so the images are the same; 0.13 GB less in fp16. The
        norms stay fp32 (autocast runs them in fp32), and so do the encoder and the quantiser, which inpainting
        runs in fp32. fp32: a no-op."""
        if dtype != torch.float32:
            for m in [self.post_quant_conv] + [m for m in self.decoder.modules() if isinstance(m, nn.Conv2d)]:
                for p in m.parameters():
                    p.data = p.data.to(dtype)  # not Module.to, which cannot swap fake tensors (utils/simulate.py)
        return self

    def encode(self, img):
        """Images (B, 3, 256, 256) in [-1, 1] -> (tokens of every scale, f_hat after every scale)."""
        return self.quantize.quantize(self.quant_conv(self.encoder(img)))
