"""Models (DiT, text encoder, VAE), samplers, weight loading and the per-rank Runner: pure torch, no Ray."""
