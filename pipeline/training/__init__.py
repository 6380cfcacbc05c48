"""Training on images: the epoch loop, checkpoints and cached views shared by stage three and the baseline."""
