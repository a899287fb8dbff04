"""Wall time and peak memory, the way the reference reports them: CUDA events and
max_memory_allocated on a GPU; perf_counter and the process's peak RSS on a CPU."""
import resource
import sys
import time

import torch


class Timer:
    def __init__(self, device):
        self.cuda = device.type == 'cuda'

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1000


def reset_peak_memory(device):
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(MiB, what the figure is)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20, 'torch.cuda.max_memory_allocated'
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (kib / 2**20 if sys.platform == 'darwin' else kib / 2**10), 'peak RSS of the whole process'
