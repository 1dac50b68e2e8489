"""Training: the loop, step, optimizer, losses, augmentation, checkpoints, config checks, preemption, workdir lock."""
