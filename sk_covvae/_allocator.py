"""Keep freed memory in the process: glibc settings for CPU training.

PyTorch on CPU allocates each step's activations and gradients with
``malloc``. Blocks of a few megabytes and more are served by glibc with
``mmap`` and handed back to the kernel on ``free``; the next step then faults
every page in again. On the default architecture at batch 256 that costs
about a quarter of a training step, and it varies from step to step (see
``docs/performance.md``). Raising glibc's ``M_MMAP_THRESHOLD`` and
``M_TRIM_THRESHOLD`` keeps those blocks in the heap for reuse, as a caching
allocator would. The same effect, for any program, comes from the
environment variables ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` (or from jemalloc or tcmalloc).

It changes the whole process, so the library never does it on its own: the
``covvae`` command line and the benchmark call :func:`retain_freed_memory`.
"""

import ctypes
import ctypes.util
import sys

# mallopt(3) parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: far above any one tensor of this package


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed blocks below 1 GiB for reuse; True if applied.

    Does nothing and returns False where the C library is not glibc (macOS,
    Windows, musl).

    Returns
    -------
    bool
        Whether both ``mallopt`` calls succeeded.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )
