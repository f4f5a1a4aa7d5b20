"""Training: data, strategies, masked optimizer steps, the trainer and evaluation."""
