"""sdkit.widgets: the notebook studio. `from sdkit.widgets import SDWidget; SDWidget()`."""

from .studio import SDWidget

__all__ = ["SDWidget"]
