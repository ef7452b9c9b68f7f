"""Stand-ins for the world around the job that the suite and the benchmarks share (nothing here is imported by the
job itself)."""
