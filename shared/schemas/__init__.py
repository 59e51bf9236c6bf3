"""Versioned message schemas (inbound events, outbound decisions)."""
