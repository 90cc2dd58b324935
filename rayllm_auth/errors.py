"""The two ways rayllm-auth refuses to run. Neither message ever holds key material."""


class ConfigError(ValueError):
    """Auth is configured but unusable (e.g. a key variable set to nothing).

    The message names the environment variable at fault. Raised where requests would be
    served, so the ingress refuses to start instead of serving without auth.
    """


class AuthUnavailableError(ImportError):
    """Keys are configured but this Ray cannot be patched (unsupported version or layout).

    An ImportError on purpose: once raised, every later import of Ray Serve LLM in the same
    process fails with the same message, so nothing can serve it unauthenticated.
    """
