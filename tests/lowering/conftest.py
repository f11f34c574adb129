import os
import zlib

import numpy as np
import pytest

# wgpu's Vulkan loader warns without it.
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fresh data per test, reproducible when run alone."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
