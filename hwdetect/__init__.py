"""Hardware detection: what compute devices a machine has, read from a root folder."""
