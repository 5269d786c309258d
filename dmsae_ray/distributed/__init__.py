"""Everything that needs Ray: Ray Data activations, Ray Train training, the
scoring actors, the coordinator actor, Ray Tune sweeps, Ray Jobs."""
