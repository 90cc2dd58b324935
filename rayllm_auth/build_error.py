"""A ConfigError raised where Ray Serve builds an app, as Serve's own exception type too.

Serve's build task (``build_serve_application``, Ray 2.60) retries any exception three times,
each try in a new process that imports Serve LLM again (10-15 s of CPU each on a small
node), but reports its own ``RayServeException`` at once, as the deploy's message. A key
configuration cannot change between tries, so rayllm-auth fails such a deploy at once, with
the same message (older Rays retry nothing, and report this exception's message too).

Imported only where a build fails: it imports Ray Serve.
"""

from ray.serve.exceptions import RayServeException

from rayllm_auth.errors import ConfigError

__all__ = ["BuildConfigError"]


class BuildConfigError(ConfigError, RayServeException):
    """A ConfigError where Serve builds an app: Serve reports it without retrying."""
