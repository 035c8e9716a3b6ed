"""Tests of django_asyncpool/sync/."""
