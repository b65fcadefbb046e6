"""Everything that runs models: worker processes, the pool, and the dynamic batcher."""
