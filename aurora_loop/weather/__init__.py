"""Weather science on top of the generic trainer: the training losses, validation metrics and
ensemble scores, autoregressive roll-outs and the replay buffer, normalisation statistics.
The tasks that use them live in :mod:`aurora_loop.tasks`."""
