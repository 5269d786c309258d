"""One distillation run: the run directory and its files, the cycle loop (pipeline),
the in-process backend, sweep planning and summaries. Ray only through the
distributed backend, imported when a run asks for it."""
