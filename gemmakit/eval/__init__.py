"""Evaluation: the LM protocol, the report's benchmarks, code execution, memorization and the report.

Where it sits: after `train` (rank 7): it reads models, tokenizers and token shards, and only the CLI
and the server import it. Submodules are imported by name (`gemmakit.eval.memorization`, ...); nothing
heavy is loaded when this package is imported.
"""
