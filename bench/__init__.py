"""Side-by-side benchmarks: each bench_*.py measures ours and a baseline in one run."""
