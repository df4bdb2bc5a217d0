"""Regression on CNN features (thesis table 5): extraction, the regression engines, and the
protocol that runs them per subject fold (``protocol``)."""
