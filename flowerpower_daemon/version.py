"""The package version, in a module of its own so any layer can read it.

(``flowerpower_daemon.__version__`` re-exports it; importing the package's
``__init__`` from below would go up the layers.)
"""

__version__ = "0.1.0"
