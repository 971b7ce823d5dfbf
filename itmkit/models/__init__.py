"""Encoders, pooling and the :class:`~itmkit.models.base.MatchingModel` interface."""
