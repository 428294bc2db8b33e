"""The ``moecompress`` command. Thin: each command parses options, calls one library function, prints.

Errors a user can fix end as one line on stderr and exit status 2.

Layout: `core` holds the Typer app, its callback, the error handling and the shared options; the commands live in
`checkpoints` (list, info, inspect, export), `compress` (profile, prune, quantize, ternary), `taer` (patterns,
retrieve) and `evaluate` (run, generate, eval). They are registered here, in the order ``moecompress --help``
lists them.
"""

from __future__ import annotations

from moecompress.cli import checkpoints, compress, evaluate, taer
from moecompress.cli.core import app

__all__ = ["app"]

app.command("list")(checkpoints.list_cmd)
app.command()(checkpoints.info)
app.command()(evaluate.run)
app.command()(compress.profile)
app.command()(compress.prune)
app.command()(compress.quantize)
app.command()(compress.ternary)
app.command()(checkpoints.inspect)
app.command()(checkpoints.export)
app.command()(taer.patterns)
app.command()(taer.retrieve)
app.command()(evaluate.generate)
app.command("eval")(evaluate.eval_cmd)
