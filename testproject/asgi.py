"""The ASGI application of the testproject: ``uvicorn testproject.asgi:application``."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

from django.core.asgi import get_asgi_application

application = get_asgi_application()
