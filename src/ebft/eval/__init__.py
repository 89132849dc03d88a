"""Evaluation: perplexity over non-overlapping windows."""

from ebft.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
