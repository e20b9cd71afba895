"""Methods: one package per method."""
