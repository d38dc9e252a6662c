"""Prefect flows: wiring only (tasks, cache keys, MLflow runs). No ML code lives here."""
