"""glibc heap settings that keep the process's memory close to its live tensors.

Two effects of glibc's allocator matter at PaliGemma's sizes:

- Its mmap threshold starts at 128 KB and rises, up to 32 MB, to the size of each memory-mapped
  block freed. After a few layers every activation under 32 MB comes from the heap, and freed
  ones stay resident as free, fragmented heap. A 3B prefill at 896 px (4160 rows) then held
  ~0.7 GB of free heap on top of its live tensors (benchmarks/RESULTS.md, "896 px prefill
  memory"). A fixed threshold gives each large activation its own mapping, returned to the OS
  when freed, at the cost of a page fault per 4 KB when one is allocated (decode steps
  allocate nothing that large; prefill was not slower in `benchmarks/bench_heap_threshold.py`).
- Freed heap is returned only from its top: temporaries freed while loading stay resident.

Only glibc on Linux is touched; elsewhere these do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

LARGE_ALLOCATION_BYTES = 4 << 20  # blocks at least this large get their own memory map
# Free heap kept at the top before glibc returns it to the OS. glibc's dynamic mode keeps twice
# the mmap threshold; fixing the threshold freezes this at 128 KB, and then every allocation
# between 128 KB and 4 MB freed at the top was returned and faulted in again on the next one
# (a 1152 -> 4304 bf16 GEMM of 256 rows: 506 page faults and 2.4 ms per call instead of none
# and 1.5 ms, `benchmarks/RESULTS.md`).
KEPT_FREE_TOP_BYTES = 2 * LARGE_ALLOCATION_BYTES
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (musl has neither: AttributeError)
    except (OSError, AttributeError):
        return None
    return libc


def map_large_allocations() -> None:
    """Fixes glibc's mmap threshold at LARGE_ALLOCATION_BYTES, and its trim threshold at
    KEPT_FREE_TOP_BYTES, for this process (idempotent).

    Each is left alone where the user set glibc's own tunable (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_) themselves.
    """
    libc = _glibc()
    if libc is None:
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_TOP_BYTES)


def release_free_heap() -> None:
    """Returns glibc's free heap pages to the OS (malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
