"""itmkit: a course and reproduction kit for fine-grained image-text matching.

The package is a straight line (see docs/DESIGN.md):
``data`` -> ``models`` -> ``similarity`` -> ``losses`` -> ``train`` -> ``evaluate`` -> ``course``/``plots``.
Methods live one per file in ``itmkit.methods`` and join through ``itmkit.methods.registry``.
"""

__version__ = "0.1.0"
