"""One module per pipeline stage. Each holds its pydantic config and a plain `run(cfg, inputs)`.

Heavy libraries (torch, transformers, trl, ...) are imported inside `run` so that importing a config
(e.g. to validate a recipe or print `alignflow --help`) stays fast.
"""
