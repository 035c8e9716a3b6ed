"""The async pool: SQLAlchemy engines over asyncpg, per event loop, and their scopes.

Imports only core/ and config/; :mod:`django_asyncpool.pool` is its public face.
"""
