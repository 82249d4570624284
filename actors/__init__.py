"""Ray actor shells that host one per-rank Runner each."""
