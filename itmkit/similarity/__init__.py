"""Similarity: the embedding dot product and the pairwise (cross-attention) engine."""
