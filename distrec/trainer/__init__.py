"""The training core under ``distrec.train``: process groups and the dense part's data parallelism,
the step, pipelined input, evaluation, the resumable state and its checkpoints, logs and metrics."""
