from .quant import PATCH_NUMS, MultiScaleQuantizer
from .sampling import Stage, code_schedule, generate
from .var import VAR, KVCache
from .vqvae import VQVAE

__all__ = ['PATCH_NUMS', 'MultiScaleQuantizer', 'Stage', 'code_schedule', 'generate', 'VAR', 'KVCache', 'VQVAE']
