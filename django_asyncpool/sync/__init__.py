"""The sync pool: Django's psycopg_pool for the ENGINE. Imports only core/ and config/."""
