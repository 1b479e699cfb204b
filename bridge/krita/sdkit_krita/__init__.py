"""sdkit for Krita: Stable Diffusion into new layers over the sdkit bridge.

Only the standard library, Krita's API and the bundled ``protocol``, ``zmtp`` and
``editor_*`` modules (copied here by ``sdkit plugin install krita``).
"""

from __future__ import annotations

try:
    from krita import DockWidgetFactory, DockWidgetFactoryBase, Krita
except ImportError:  # imported outside Krita (packaging, linting)
    Krita = None


def _register() -> None:
    from .docker import SdkitDocker
    from .extension import SdkitExtension

    app = Krita.instance()
    app.addExtension(SdkitExtension(app))
    position = getattr(DockWidgetFactoryBase, "DockRight", None)
    if position is None:  # PyQt6 scoped enums
        position = DockWidgetFactoryBase.DockPosition.DockRight
    app.addDockWidgetFactory(DockWidgetFactory("sdkit_docker", position, SdkitDocker))


if Krita is not None and Krita.instance() is not None:
    _register()
