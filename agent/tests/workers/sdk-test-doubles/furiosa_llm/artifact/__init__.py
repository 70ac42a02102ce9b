"""TEST DOUBLE of furiosa_llm.artifact (tests only)."""
