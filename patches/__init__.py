"""One module per Ray Serve LLM code layout, each holding one
:class:`~rayllm_auth.layout.Layout` record named ``LAYOUT``: the Ray releases it covers, what
rayllm-auth wraps there, and which replicas face clients. :mod:`rayllm_auth.support` lists
them; :mod:`rayllm_auth.patching` applies them. Installed as ``rayllm_auth.patches``
(``rayllm_auth/patches`` in the source tree is a symlink to this directory).
"""
