"""Experiments of the paper's protocol: the sweep, the dependency analysis, reports and figures."""
