"""Packed into every .mar as ``handler.py``: TorchServe loads the one class defined here.

The handler itself lives in the installed project (``serving.handler``), so an archive never carries
a second, drifting copy of it; the worker's Python (the project's venv) imports it.
"""

from serving.handler import ClassifierHandler


class ArchivedClassifierHandler(ClassifierHandler):
    """The handler TorchServe instantiates; all behaviour is inherited."""
