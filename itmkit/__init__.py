"""itmkit: a course and reproduction kit for fine-grained image-text matching.

The package is a straight line of imports (see docs/DESIGN.md): ``data`` -> ``models`` ->
``similarity`` -> ``losses`` -> ``methods`` -> ``evaluate`` -> ``train`` -> ``runs`` -> ``figures``
-> ``course`` / ``cli``.
Methods live one per file in ``itmkit.methods`` and join through ``itmkit.methods.registry``.
"""

__version__ = "0.1.0"
