"""TEST DOUBLE of rebel-compiler (tests only)."""
__version__ = "0.0.0+test-double"
