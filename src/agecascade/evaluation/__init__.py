"""Target protocols (FG-NET leave-one-person-out, Adience folds), their metrics and error analysis."""
