"""Distributed MNIST trainer: `torchrun --nproc_per_node=N -m distributed.train`."""
