"""Test set-up: 8 emulated CPU devices so any test can build a data/fsdp/tensor mesh."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("EFFJAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # configs/ is a top-level folder, not an installed package
    sys.path.insert(0, ROOT)
