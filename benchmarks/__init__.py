"""GPU benchmark scripts, run as modules: python -m benchmarks.<script>."""
