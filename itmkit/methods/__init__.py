"""One file per method; :mod:`itmkit.methods.registry` maps names to them."""

from itmkit.methods.registry import available_methods, get_method

__all__ = ["available_methods", "get_method"]
