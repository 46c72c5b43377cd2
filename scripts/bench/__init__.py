"""The benchmark suite: `python -m scripts.bench` (from the repository root) runs ftune against TRL on the same
model, data, method and hardware and prints one side-by-side table; `--curves` adds scaling curves as PNG files.
The measuring itself is scripts/bench_train.py (one ftune-vs-TRL comparison per call, in child processes)."""
