"""Data sources (folders, tensorflow-datasets) and image decoding."""
