"""Training: losses on rollouts, optax chains, augmentation, pure train steps, the epoch loop
with checkpoints and resume, evaluation tables and data parallelism."""
