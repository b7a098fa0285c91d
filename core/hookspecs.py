"""Hook specifications for connector plugins (pluggy, project name "ipaas")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from ipaas.sdk import Connector

hookspec = pluggy.HookspecMarker("ipaas")
hookimpl = pluggy.HookimplMarker("ipaas")


@hookspec
def ipaas_register_connectors(register: "Callable[[Connector], None]") -> None:
    """Register this plugin's connectors by calling `register(connector)` once for each.

    Returns nothing. Called once, when the plugin host loads plugins.
    """
