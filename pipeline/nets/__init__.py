"""Networks: the bases table, weights, and the Keras feature extractor."""
