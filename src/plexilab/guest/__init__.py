"""Code that runs inside guests or as lab relays, shipped as files."""
