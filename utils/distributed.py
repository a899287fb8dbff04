"""torchrun support: one process per GPU (NCCL) or per CPU worker (gloo); nothing when run plainly."""
import os

import torch
import torch.distributed as dist


def setup(device):
    """(rank, world_size, device): under torchrun each process takes the GPU of its LOCAL_RANK, and the process
    group starts even for one process (so torchrun --nproc_per_node=1 runs NCCL as eight processes would)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1 and 'TORCHELASTIC_RUN_ID' not in os.environ:
        return 0, 1, device
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', device_id=device if device.type == 'cuda' else None)
    return dist.get_rank(), world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def total(n, device):
    """n summed over the processes (n itself when run plainly); every process waits for the others."""
    if not dist.is_initialized():
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t)
    return int(t.item())
