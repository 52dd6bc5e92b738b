"""Fused GPU kernels over packed codes (Metal and CUDA; see README.md for the map).

``decode_attention`` returns the attention output, or None where the fused path does not
apply (the caller then runs its reference). ``settle`` turns a cache's live dict into
plain packed views for any other reader.
"""

from .check import backend
from .decode import decode_attention, settle
from .plan import MAX_QUERY_LEN

__all__ = ["decode_attention", "backend", "settle", "MAX_QUERY_LEN"]
