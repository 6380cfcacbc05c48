"""Stage two: fit a head on cached features; learning curves."""
