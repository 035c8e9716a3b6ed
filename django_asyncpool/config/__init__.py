"""Configuration: ``DATABASES[alias]`` plus the environment, read into frozen objects.

The package's parts: :mod:`.model` (the frozen objects), :mod:`.reader` (reading and
validating a ``DATABASES`` entry, :func:`from_settings`, :func:`load`), :mod:`.url`
(``DATABASE_URL``), :mod:`.keys` (which OPTIONS keys are whose), :mod:`.rules` (every
problem id in one table, what is refused). Everything public is re-exported here.
"""

from .keys import (
    DJANGO_OPTIONS as DJANGO_OPTIONS,
)
from .keys import (
    ENV_ASYNC as ENV_ASYNC,
)
from .keys import (
    FLAGS as FLAGS,
)
from .keys import (
    OUR_KEYS as OUR_KEYS,
)
from .keys import (
    SECTIONS as SECTIONS,
)
from .keys import (
    psycopg_keys,
    psycopg_params,
)
from .model import (
    ENGINE as ENGINE,
)
from .model import (
    SYNC_POOL_DEFAULTS as SYNC_POOL_DEFAULTS,
)
from .model import (
    WARMUP_DEFAULT as WARMUP_DEFAULT,
)
from .model import (
    AliasConfig,
    AsyncPoolConfig,
    BreakerConfig,
    MetricsConfig,
    Problem,
    RetryConfig,
)
from .reader import (
    STORAGE_PREFIX as STORAGE_PREFIX,
)
from .reader import (
    STORAGE_SCHEMES as STORAGE_SCHEMES,
)
from .reader import (
    Reader as Reader,
)
from .reader import (
    database_only,
    from_settings,
    load,
    load_metrics,
)
from .reader import (
    failover_aliases as failover_aliases,
)
from .reader import (
    metrics_from as metrics_from,
)
from .reader import (
    pgbouncer_problems as pgbouncer_problems,
)
from .reader import (
    storage_checked as storage_checked,
)
from .reader import (
    sync_pool_options as sync_pool_options,
)
from .rules import (
    PGBOUNCER_CONFLICTS as PGBOUNCER_CONFLICTS,
)
from .rules import (
    pgbouncer_on as pgbouncer_on,
)
from .rules import (
    refuse_unusable as refuse_unusable,
)
from .url import (
    SSL_MODES as SSL_MODES,
)
from .url import (
    URL_FORM as URL_FORM,
)
from .url import (
    URL_SCHEMES as URL_SCHEMES,
)
from .url import (
    InvalidURL,
    parse_url,
)
from .url import (
    connection_fields as connection_fields,
)

__all__ = [
    "AliasConfig",
    "AsyncPoolConfig",
    "BreakerConfig",
    "InvalidURL",
    "MetricsConfig",
    "Problem",
    "RetryConfig",
    "database_only",
    "from_settings",
    "load",
    "load_metrics",
    "parse_url",
    "psycopg_keys",
    "psycopg_params",
]
