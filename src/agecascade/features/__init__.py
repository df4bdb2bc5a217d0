"""Regression on CNN features (thesis table 5): extraction and the regression engines."""
