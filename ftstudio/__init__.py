"""ftstudio: a local-first fine-tuning studio whose training runs survive restarts."""

__version__ = "0.1.0"
