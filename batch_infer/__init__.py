"""Nightly batch inference under the SCID-trie constraint, and evaluation."""
