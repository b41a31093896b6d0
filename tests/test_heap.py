"""paligemma.heap: large activations get their own memory map once a model is loaded."""

import subprocess
import sys
import textwrap

import pytest

from paligemma import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="needs glibc (Linux)")

# A fresh interpreter: glibc's dynamic threshold depends on what the process freed before.
# mallinfo2().hblkhd is the number of bytes in memory-mapped blocks.
PROBE = textwrap.dedent("""
    import ctypes, torch
    from paligemma import heap

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mapped_by(nbytes):
        before = libc.mallinfo2().hblkhd
        t = torch.empty(nbytes // 4)
        grown = libc.mallinfo2().hblkhd - before
        del t
        return grown

    torch.empty(30 << 18)  # freed at once: a freed 30 MB mapping raises glibc's threshold to 30 MB
    print(mapped_by(8 << 20) >= 8 << 20)
    heap.map_large_allocations()
    # 16 MB: more than the free 8 MB heap chunk, so memory must come from the OS (a free
    # heap chunk large enough is reused whatever the threshold)
    print(mapped_by(16 << 20) >= 16 << 20)
""")


def test_large_allocations_mapped_after_the_call():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    before, after = out.stdout.splitlines()
    assert before == "False"  # glibc's dynamic threshold: an 8 MB tensor comes from the heap
    assert after == "True"  # then new large blocks get their own mapping, not more heap
