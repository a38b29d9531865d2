"""Benchmarks of the pipeline, run from the repository root as ``python -m bench.<name>``
(``make bench`` runs ``python -m bench.run_all``). Each merges its object into
bench/results.json. This package may import anything below it (bbam, tasks, flows)."""
