"""The glibc allocator setting used by the command line and the benchmark."""

import platform
import sys

from sk_covvae._allocator import retain_freed_memory


def test_retain_freed_memory_applies_on_glibc_and_is_a_no_op_elsewhere():
    applied = retain_freed_memory()
    assert isinstance(applied, bool)
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert applied == on_glibc
    # Calling it again is harmless.
    assert retain_freed_memory() == applied
