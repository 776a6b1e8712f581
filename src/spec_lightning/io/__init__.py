"""Input and output beyond a run's own checkpoints: the offline bundle for air-gapped nodes."""
