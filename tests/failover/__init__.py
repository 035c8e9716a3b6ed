"""Tests of django_asyncpool/failover/."""
