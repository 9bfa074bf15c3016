"""effjax: efficient transformers in JAX/Flax."""

import setuptools

setuptools.setup(
    name="effjax",
    version="0.1.0",
    description="Efficient attention methods, Pallas kernels and a sharded trainer in JAX/Flax.",
    # kernels/ (top level, beside effjax/) installs as effjax.kernels: a bare "kernels" would collide with the
    # PyPI package of that name.
    packages=setuptools.find_packages(include=["effjax", "effjax.*"]) + ["effjax.kernels"],
    package_dir={"effjax.kernels": "kernels"},
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.11,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.15",
        "tensorflow-datasets>=4.9.9",
        "ml-collections>=1.1",
        "numpy>=2.0",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.6", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", "matplotlib>=3.8", "ruff>=0.6", "portpicker>=1.6", "ray>=2.9"],
        "ray": ["ray>=2.9"],  # architecture search past one machine (effjax.search with config.ray_address)
        "gpu": ["jax[cuda12]>=0.11,<0.13"],
        "tpu": ["jax[tpu]>=0.11,<0.13"],
    },
)
