"""Numerics: formats, bit packing, and range selection (the lowest layer)."""

from jaxq.numerics.formats import NF4_CODEBOOK, Format, format_names, get_format

__all__ = ["NF4_CODEBOOK", "Format", "format_names", "get_format"]
