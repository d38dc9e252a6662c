"""alignflow: one YAML recipe in, a trained, evaluated, registered model out."""

__version__ = "0.1.0"
