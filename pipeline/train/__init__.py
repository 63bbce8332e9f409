"""Training: the loop, the context recipes use, checkpoints, shared GAN pieces, and recipes/."""
