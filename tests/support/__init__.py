"""Infrastructure the tests and the benchmarks share: real servers on free ports (`servers`), a bounded
load runner (`loadgen`), waits on a condition (`wait`) and what the deploy/ tests read (`deploy`)."""
