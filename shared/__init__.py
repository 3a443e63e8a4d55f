"""The shard contract both halves of the product import: `prep` writes it, `train` reads it."""
