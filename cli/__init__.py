"""The infersnap command line."""
