"""Channels: where messages come in and replies go out."""
