"""What evomerge's tests and benchmarks share that is not part of merging: a throw-away PostgreSQL server
(``postgres``). Like ``optuna.testing``, it ships with the package so benchmarks need not import tests."""
