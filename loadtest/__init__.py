"""Load tests and serving benchmarks: locust suites with SLO gates, TorchServe sweeps, soak and faults."""
