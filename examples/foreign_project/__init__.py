"""A Lightning project that knows nothing of spec_lightning but reuses its callbacks and methods."""
