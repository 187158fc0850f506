"""`ftstudio`: the command line."""
