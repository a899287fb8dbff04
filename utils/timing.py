"""Wall time and peak memory, the way the reference reports them: CUDA events and
max_memory_allocated on a GPU; perf_counter and the process's peak RSS on a CPU. And the progress
bar of long work."""
import resource
import sys
import time

import torch
from tqdm import tqdm


class Clock:
    """Timestamps that do not stop the GPU: CUDA events on a GPU (read after synchronize),
    perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == 'cuda'
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, i, j):
        """Milliseconds from mark i to mark j (after synchronize)."""
        if self.cuda:
            return self.marks[i].elapsed_time(self.marks[j])
        return (self.marks[j] - self.marks[i]) * 1000


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


def progress(show=True, **kw):
    """A tqdm bar drawn only on a terminal (tqdm's disable=None), as the usual convention: a log file or
    a pipe gets the scripts' own lines, not hundreds of bar refreshes. show=False: none (torchrun ranks > 0)."""
    return tqdm(disable=None if show else True, **kw)
