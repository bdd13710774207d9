"""Cryptographic building blocks for keyden (thin, pure wrappers over pyca ``cryptography``)."""
