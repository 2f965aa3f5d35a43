"""The analysis half: unit draws, Gram-based distances, differentiation, RDMs, regressions and summaries."""
