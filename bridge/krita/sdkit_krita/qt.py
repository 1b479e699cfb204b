"""The PyQt that this Krita was built with: PyQt6 in Krita 6, PyQt5 in Krita 5.

Importing ``krita`` first loads Krita's own PyQt; we never import the other one, since
two Qt majors in one process crash. The code uses fully scoped enum names
(``Qt.AlignmentFlag.AlignLeft``), which both PyQt5 (5.11+) and PyQt6 accept.
"""

from __future__ import annotations

import sys

try:  # Inside Krita; outside (e.g. linting) fall back to whichever PyQt exists.
    import krita  # noqa: F401
except ImportError:  # pragma: no cover - only outside Krita
    krita = None

if "PyQt6.QtCore" in sys.modules or ("PyQt5.QtCore" not in sys.modules and krita is None):
    try:
        from PyQt6 import QtCore, QtGui, QtWidgets  # type: ignore[import-not-found]

        QT6 = True
    except ImportError:  # pragma: no cover
        from PyQt5 import QtCore, QtGui, QtWidgets  # type: ignore[import-not-found,no-redef]

        QT6 = False
else:
    from PyQt5 import QtCore, QtGui, QtWidgets  # type: ignore[import-not-found,no-redef]

    QT6 = False

Qt = QtCore.Qt
QTimer = QtCore.QTimer
QObject = QtCore.QObject
Signal = QtCore.pyqtSignal

__all__ = ["QT6", "Qt", "QTimer", "QObject", "Signal", "QtCore", "QtGui", "QtWidgets"]
