"""gvae's Hydra plugins: the rows sweeper (and the packed launcher)."""
