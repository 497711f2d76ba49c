"""Measuring and choosing layouts: benchmarks with aiperf, results computed
from their raw exports, reports and Pareto fronts, sweeps, the SLA sizing
with AIConfigurator, and `disagg top`."""
