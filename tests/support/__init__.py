"""Infrastructure the tests and the benchmarks share: real servers on free ports, a bounded load runner."""
