"""Test set-up: 8 emulated CPU devices so any test can build a data/fsdp/tensor mesh."""

import os
import sys

# XLA's CPU backend optimisations (LLVM passes) take most of the compile time of the tests' small programs and change
# no results: off, the default tier runs in 7.5 minutes instead of 10.5 on 2 cores (2026-12-05).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("EFFJAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA's persistent compilation cache, shared by the test processes and every run they spawn (subprocess_env copies
# the environment): the trainer's subprocess tests compile the same smoke models over and over (a listops smoke
# run: 16 s cold, 6 s warm). A size limit turns on jax's file lock, so concurrent writers never interleave.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "xla-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))
if ROOT not in sys.path:  # configs/ is a top-level folder, not an installed package
    sys.path.insert(0, ROOT)
