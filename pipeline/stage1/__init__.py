"""Stage one: run a frozen base once over a dataset and write pooled features (runtime, runner, distributors)."""
