"""A Ray Serve LLM code layout, as data: what rayllm-auth wraps in it, and which replicas face
clients.

One :class:`Layout` record per layout lives in ``patches/`` (installed as
``rayllm_auth.patches``); :mod:`rayllm_auth.support` chooses one for a Ray version;
:mod:`rayllm_auth.patching` applies it; ``rayllm-auth doctor`` checks the same record. A
record names its targets by module and attribute path, so nothing here imports Ray.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Wrap", "Target", "ClientFacing", "Layout"]


class Wrap(enum.Enum):
    """How a target is changed (see :mod:`rayllm_auth.patching`)."""

    RETURNED_APP = "protect the app it returns"
    APP_ARGUMENT = "protect its app= argument before it freezes it"
    MODULE_APP = "protect this app in place, as the module is imported"
    REPLICA_APP = "guard the app a client-facing replica receives"


@dataclass(frozen=True)
class Target:
    module: str  #: where the target lives; patched right after this module is imported
    attribute: str  #: attribute path inside the module, e.g. ``ASGIAppReplicaWrapper.__init__``
    wrap: Wrap

    @property
    def builder_side(self) -> bool:
        """True for targets where the app is built (patched only when keys are configured
        here); the replica-side target is patched in every Ray worker."""
        return self.wrap is not Wrap.REPLICA_APP


@dataclass(frozen=True)
class ClientFacing:
    """A deployment class whose replicas answer clients directly."""

    module: str
    name: str
    #: True if its app serves one model whatever a request names (direct streaming: the
    #: engine's own app); the replica then tells the middleware which (its LLMConfig).
    serves_one_model: bool = False


@dataclass(frozen=True)
class Layout:
    name: str  #: the patch module's name
    ray: str  #: PEP 440 specifier of the Ray releases with this layout
    summary: str  #: what is wrapped, in one line (the README's support table)
    targets: tuple[Target, ...]
    client_facing: tuple[ClientFacing, ...]
    replica_app_argument: str  #: name of the replica-side target's app argument

    def modules(self, *, builder_side: bool) -> list[str]:
        """Modules with targets to patch: the replica side always, the builder side too when
        ``builder_side``."""
        return sorted({t.module for t in self.targets if builder_side or not t.builder_side})

    def required(self) -> dict[str, tuple[str, ...]]:
        """Every attribute that must exist, by module: the targets, and the client-facing
        classes that live in a target module (the ingress class). Checked before patching
        and by ``doctor``."""
        required: dict[str, list[str]] = {}
        for target in self.targets:
            required.setdefault(target.module, []).append(target.attribute)
        for cls in self.client_facing:
            if cls.module in required:
                required[cls.module].append(cls.name)
        return {module: tuple(attributes) for module, attributes in required.items()}
