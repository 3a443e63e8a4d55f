"""`train`: a lean varlen trainer over packed shards. Imports `shared`, never `prep`."""

__version__ = "0.1.0"
