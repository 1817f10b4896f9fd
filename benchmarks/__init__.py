"""lowrank's benchmark suite: ``python -m benchmarks --quick``."""
