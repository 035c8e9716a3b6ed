"""The ASGI application of the testproject: ``uvicorn testproject.asgi:application``.

Django's application wrapped in django_asyncpool's lifespan handler: the server's
shutdown closes the pools.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

from django_asyncpool.asgi import get_asgi_application

application = get_asgi_application()
