"""Synthetic demo data: small, deterministic stand-ins for the five thesis datasets."""
from .writers import write_demo_datasets

__all__ = ["write_demo_datasets"]
