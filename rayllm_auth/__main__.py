"""``python -m rayllm_auth``: the ``rayllm-auth`` command (see :mod:`rayllm_auth.cli`)."""

from rayllm_auth.cli import main

raise SystemExit(main())
