"""The genq command line."""
