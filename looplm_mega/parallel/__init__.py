"""Parallelism across devices: process groups (state), autograd collectives (comm) and the
tensor-parallel split of the looped block (tensor_parallel)."""
