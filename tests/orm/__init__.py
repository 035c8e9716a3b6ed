"""Tests of django_asyncpool/orm/."""
