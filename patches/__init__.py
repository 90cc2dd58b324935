"""One module per Ray Serve LLM code layout; :mod:`rayllm_auth.support` says which Ray
versions use which. Installed as ``rayllm_auth.patches`` (``rayllm_auth/patches`` in the
source tree is a symlink to this directory).

Each module defines:

``BUILDER_HOOKS``
    ``{module name: function name}``: patches for where the ingress app is built
    (enforce mode only).
``TARGETS``
    ``{module name: (attribute path, ...)}``: every attribute the hooks need
    (``rayllm-auth doctor`` checks them without patching anything).
``REPLICA_HOOKS``
    the same, for where a replica receives its ASGI app (enforce and report mode).

A hook function takes the freshly imported module, checks every target it needs with
:func:`rayllm_auth.patching.require` and wraps them with
:func:`rayllm_auth.patching.wrap_once`. If it raises, rayllm-auth fails closed.
"""
