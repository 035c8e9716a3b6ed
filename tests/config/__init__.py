"""Tests of django_asyncpool/config/."""
