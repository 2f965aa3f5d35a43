"""Model backends: what extraction needs from a deep-learning framework."""
