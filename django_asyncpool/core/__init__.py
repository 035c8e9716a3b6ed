"""The core every pool stands on."""
