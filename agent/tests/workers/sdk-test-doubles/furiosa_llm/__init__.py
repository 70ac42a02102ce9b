"""TEST DOUBLE of furiosa-llm (tests only): no compiler, no NPU."""
__version__ = "0.0.0+test-double"
