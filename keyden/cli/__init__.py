"""The keyctl-compatible command line."""
