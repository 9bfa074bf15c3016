"""Inference: sampling from a decoder LM with cached or recurrent decoding (``generate``), the token samplers
(``sampling``), and loading a trained run for it (``checkpoint``). The command is ``python -m effjax.sample``."""

from effjax.inference.context import Context
from effjax.inference.generate import Generated, generate

__all__ = ["Context", "Generated", "generate"]
