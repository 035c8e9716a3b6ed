"""sqla."""
