"""The WSGI application of the testproject (``manage.py runserver`` uses it)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
