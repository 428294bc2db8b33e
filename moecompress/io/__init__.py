"""Model and file I/O, below everything that runs a model: checkpoints read and written tensor by tensor
(`checkpoint`), their checks (`validate`), whole models and their sidecar (`model`, `describe`), and outputs
that appear whole or not at all (`outdir`, `fsops`). Import the modules; this package re-exports nothing, so
that `outdir` stays light (no torch) for the processes that only need it."""

__all__: list[str] = []
