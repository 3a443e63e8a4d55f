"""`prep`: documents to packed, verified Arrow shards. Imports `shared`, never `train` or torch."""

__version__ = "0.1.0"
