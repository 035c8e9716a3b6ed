"""Tests of django_asyncpool/core/."""
