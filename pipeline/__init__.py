"""tlpipe: cache frozen-base image features once, fit many heads on them."""

__version__ = "0.1.0"
