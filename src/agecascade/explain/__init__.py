"""Explainability maps (Grad-CAM) for age networks, and the before/after figure (``figure``)."""
