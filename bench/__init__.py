"""corral's benchmarks: `python -m bench [--quick]` (see docs/benchmarks.md).

Benchmarks print figures, each against a baseline measured in the same run;
they are not tests and assert nothing about timings.
"""
