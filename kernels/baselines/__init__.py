"""Kernels kept only as baselines for benchmarks and their tests, not used by the server: the
two-kernel CATS MLP (``gate_up``: gate + up in one launch; ``down``: the sparse down
projection) that the fused up + down kernel replaced. Not part of ``cats_serve.kernels``' API."""
