"""The features file: HDF5 schema, fingerprint, reader, fusion, shards and staleness (the only code that touches its layout)."""
