"""The training entry point's pieces: flags, data feeding, model setup, loop, checkpoints, logging."""
