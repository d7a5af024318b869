"""Host-memory tuning for merging large tensors on the CPU.

glibc returns every freed block above its mmap threshold (at most 32 MiB by
default) to the kernel, so each new tensor of a large weight matrix is fresh
memory that page-faults on first touch: an elementwise op on a 64 MiB tensor
then costs several times its arithmetic. Raising the thresholds keeps freed
blocks for reuse. This is a process-wide setting: call it once at program start
(the CLI does), never from library code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_host_allocator(threshold_bytes: int = 1 << 30) -> bool:
    # glibc documents a 32 MiB ceiling for M_MMAP_THRESHOLD, but current versions accept larger values;
    # where a call is refused (returns 0) nothing changes and we report False.
    """Ask glibc malloc to keep freed blocks up to ``threshold_bytes`` for reuse; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trim = min(2 * threshold_bytes, 2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
