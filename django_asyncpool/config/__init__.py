"""Configuration: ``DATABASES[alias]`` plus the environment, read into frozen objects."""

from .reader import (
    DJANGO_OPTIONS as DJANGO_OPTIONS,
)
from .reader import (
    ENGINE as ENGINE,
)
from .reader import (
    ENV_ASYNC as ENV_ASYNC,
)
from .reader import (
    FLAGS as FLAGS,
)
from .reader import (
    OUR_KEYS as OUR_KEYS,
)
from .reader import (
    PGBOUNCER_CONFLICTS as PGBOUNCER_CONFLICTS,
)
from .reader import (
    SECTIONS as SECTIONS,
)
from .reader import (
    SSL_MODES as SSL_MODES,
)
from .reader import (
    STORAGE_PREFIX as STORAGE_PREFIX,
)
from .reader import (
    STORAGE_SCHEMES as STORAGE_SCHEMES,
)
from .reader import (
    SYNC_POOL_DEFAULTS as SYNC_POOL_DEFAULTS,
)
from .reader import (
    URL_FORM as URL_FORM,
)
from .reader import (
    URL_SCHEMES as URL_SCHEMES,
)
from .reader import (
    WARMUP_DEFAULT as WARMUP_DEFAULT,
)
from .reader import (
    AliasConfig,
    AsyncPoolConfig,
    BreakerConfig,
    InvalidURL,
    MetricsConfig,
    Problem,
    RetryConfig,
    from_settings,
    load,
    load_metrics,
    parse_url,
    psycopg_keys,
    psycopg_params,
)
from .reader import (
    Reader as Reader,
)
from .reader import (
    connection_fields as connection_fields,
)
from .reader import (
    failover_aliases as failover_aliases,
)
from .reader import (
    metrics_from as metrics_from,
)
from .reader import (
    pgbouncer_on as pgbouncer_on,
)
from .reader import (
    pgbouncer_problems as pgbouncer_problems,
)
from .reader import (
    refuse_unusable as refuse_unusable,
)
from .reader import (
    storage_checked as storage_checked,
)
from .reader import (
    sync_pool_options as sync_pool_options,
)

__all__ = [
    "AliasConfig",
    "AsyncPoolConfig",
    "BreakerConfig",
    "InvalidURL",
    "MetricsConfig",
    "Problem",
    "RetryConfig",
    "from_settings",
    "load",
    "load_metrics",
    "parse_url",
    "psycopg_keys",
    "psycopg_params",
]
