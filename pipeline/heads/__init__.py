"""Heads fitted on cached features (in memory or streamed from HDF5)."""
