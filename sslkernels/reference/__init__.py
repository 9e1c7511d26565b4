"""Plain-PyTorch reference implementations: the oracles the kernels are tested against."""
