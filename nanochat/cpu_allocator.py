"""
CPU memory allocator: make glibc keep and reuse freed memory during training and decoding on CPU.
"""

_ALLOCATOR_CONFIGURED = False


def configure_cpu_allocator():
    """Keep freed memory in the process instead of handing it back to the OS. glibc serves
    allocations >= 128 KiB (up to 32 MiB, adaptively) with fresh mmap()s and unmaps them on free,
    so every large temporary of a CPU training step (activations, the tokens x vocab logits) pays
    its page faults again on every step: 30-40% of a d4 step, e.g. allocating a 128 MiB logits
    tensor costs as much as the matmul that fills it. With mmap off and trimming practically
    off, the heap grows to the step's peak once and is reused. (glibc still falls back to mmap
    if the heap cannot grow.) Linux/glibc only; a no-op elsewhere. Called by setup_optimizers()
    when training on CPU; the same can be had with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647."""
    global _ALLOCATOR_CONFIGURED
    if _ALLOCATOR_CONFIGURED:
        return
    _ALLOCATOR_CONFIGURED = True
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        libc.mallopt(M_TOP_PAD, 64 * 1024 * 1024)
    except (OSError, AttributeError):
        pass
