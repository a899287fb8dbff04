"""Multi-scale residual quantiser of VAR's VQVAE.

An image's 16x16 feature map f is described by 10 token maps of growing size
(patch_nums). Scale k's tokens are looked up in the codebook, upsampled to 16x16,
passed through a small conv (phi) and added to the running sum f_hat. VAR's next
input is f_hat area-downsampled to the size of the next scale.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class Phi(nn.Conv2d):
    """h -> (1 - r) * h + r * conv3x3(h): the residual refinement after each scale."""

    def __init__(self, channels: int, resi_ratio: float = 0.5):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = resi_ratio

    def forward(self, h):
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiBank(nn.Module):
    """K convs shared by the scales: scale k uses the one whose tick is nearest k / (S - 1)."""

    def __init__(self, channels: int, count: int, resi_ratio: float = 0.5):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, resi_ratio) for _ in range(count))
        margin = 1 / 3 / count if count == 4 else 1 / 2 / count  # the official rule, odd as it is
        self.ticks = np.linspace(margin, 1 - margin, count)

    def for_scale(self, si: int, num_scales: int) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - si / (num_scales - 1))))]


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size=4096, Cvae=32, patch_nums=PATCH_NUMS, share_quant_resi=4, quant_resi=0.5):
        super().__init__()
        self.vocab_size, self.Cvae, self.patch_nums = vocab_size, Cvae, tuple(patch_nums)
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.quant_resi = PhiBank(Cvae, share_quant_resi, quant_resi)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.for_scale(si, len(self.patch_nums))

    def add_scale(self, si: int, f_hat, h_BChw, known=None):
        """Add scale si's embedded tokens h_BChw (B, Cvae, pn, pn) to f_hat (B, Cvae, 16, 16), in place.

        known = (f_hat_of_input_at_si, mask_keep) overwrites the kept region with the input
        image's features (zero-shot inpainting). Returns the next scale's input, area-resized
        f_hat (B, Cvae, pn', pn'), or None after the last scale.
        """
        last = len(self.patch_nums) - 1
        side = self.patch_nums[-1]
        if si != last:
            h_BChw = F.interpolate(h_BChw, size=(side, side), mode='bicubic')
        f_hat.add_(self.phi(si)(h_BChw))
        if known is not None:
            f_known, keep = known
            f_hat.copy_(torch.where(keep, f_known, f_hat))
        if si == last:
            return None
        pn = self.patch_nums[si + 1]
        return F.interpolate(f_hat, size=(pn, pn), mode='area')

    @torch.no_grad()
    def teacher_inputs(self, tokens_BL):
        """Training's VAR input of scales 1.. (B, L - 1, Cvae) from known tokens of every scale
        (B, L), built by add_scale exactly as sampling builds it from sampled tokens. Always fp32:
        the inputs are data, not part of the mixed-precision model."""
        B, side = tokens_BL.shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(B, self.Cvae, side, side, device=tokens_BL.device)
        inputs, begin = [], 0
        with torch.autocast(tokens_BL.device.type, enabled=False):
            for si, pn in enumerate(self.patch_nums[:-1]):
                h_BChw = self.embedding(tokens_BL[:, begin:begin + pn * pn]).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                inputs.append(self.add_scale(si, f_hat, h_BChw).flatten(2).transpose(1, 2))
                begin += pn * pn
        return torch.cat(inputs, dim=1)

    def quantize(self, f_BChw):
        """Encode a feature map into every scale's tokens (each (B, pn*pn)) and f_hat after each scale."""
        B, C, H, W = f_BChw.shape
        f_rest, f_hat = f_BChw.clone(), torch.zeros_like(f_BChw)
        codebook = self.embedding.weight
        tokens, f_hats = [], []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = f_rest if si == last else F.interpolate(f_rest, size=(pn, pn), mode='area')
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            # squared distances, written the way the reference does so that ties break identically
            dist = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1)
            dist.addmm_(z_NC, codebook.T, alpha=-2, beta=1)
            idx_N = torch.argmin(dist, dim=1)
            h = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
            if si != last:
                h = F.interpolate(h, size=(H, W), mode='bicubic')
            h = self.phi(si)(h.contiguous())
            f_hat.add_(h)
            f_rest.sub_(h)
            tokens.append(idx_N.view(B, pn * pn))
            f_hats.append(f_hat.clone())
        return tokens, f_hats
