"""Pure functions over stored per-sample records: accuracies, intervals, statistics."""
