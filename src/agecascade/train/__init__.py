"""Training: data from the crop store, augmentation, the epoch loop and resumable checkpoints."""
