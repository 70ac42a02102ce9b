"""TEST DOUBLE of the optimum namespace (tests only)."""
