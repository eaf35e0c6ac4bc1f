"""`make bench`: cost and speed figures, each measured beside its reference in the same run."""
