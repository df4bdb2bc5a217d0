"""Explainability maps (Grad-CAM) for age networks."""
