"""Peak memory of a call: what the memory benchmarks report and the memory-copy tests bound."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any


def peak_extra_bytes(fn: Callable[[], Any], device: Any = "cpu") -> int:
    """Peak bytes allocated on ``device`` while ``fn()`` runs, beyond what was allocated before.

    CUDA: the allocator's peak statistics. CPU: the allocation and free events that ``torch.profiler`` records
    with ``profile_memory=True``, summed in time order (tensors only; Python objects are not counted).
    """
    import torch

    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # + allocated, - freed
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak
