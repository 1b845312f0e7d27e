"""The instance LiteLLM loads from ``litellm_settings.callbacks: litellm_routenlp.proxy_hook.routenlp``.

Importing this module reads the settings of the proxy being started.  Any invalid setting or artifact
stops the proxy here, with one message naming the setting and the problem, instead of failing on the
first request.
"""

from __future__ import annotations

import sys

from .config import SettingsError, find_config_path
from .plugin import RouteNLPCallback

try:
    routenlp = RouteNLPCallback.from_config(find_config_path())
except SettingsError as error:
    sys.stderr.write(f"\nRouteNLP: refusing to start: {error}\n\n")
    sys.stderr.flush()
    raise SystemExit(3) from None

# POST /routenlp/verdicts on this proxy's app, behind LiteLLM's key check (verdicts.py)
from .verdicts import mount_verdict_route  # noqa: E402

mount_verdict_route(routenlp)
