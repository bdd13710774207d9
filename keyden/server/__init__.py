"""The daemon: configuration, peer identity, hardening, request dispatch, serving."""
