"""The native async ORM: Django's async QuerySet API over psycopg async connections.

Imports core/ and config/, and the ENGINE's DatabaseWrapper its connections carry.
"""
