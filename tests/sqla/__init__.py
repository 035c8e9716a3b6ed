"""Tests of django_asyncpool/sqla/."""
