"""Bottom layer: exceptions, atomic files, logging and progress, the never-replace guard."""
