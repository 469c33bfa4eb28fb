"""Training: `OscillationConfig` / `OscillationTrainer`, the training methods and their labels, oscillation
tracking and its figures, the Trainer's model card, and the checks that refuse unsupported sharding."""
