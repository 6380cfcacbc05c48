"""Export a head and its base as one model; predict and evaluate with it."""
