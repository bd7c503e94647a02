"""`personascope serve`: an OpenAI-compatible server that steers and monitors persona traits per request.

Example:
    >>> from personascope.serve import Registry, create_app
    >>> handle = load_model()
    >>> app = create_app(handle, Registry.load(handle, {"pirate": "runs/pirate/vector.safetensors"}))
"""

from personascope.serve.app import create_app
from personascope.serve.background import BackgroundServer
from personascope.serve.protocol import Limits
from personascope.serve.registry import Registry, ServedVector, alert_threshold

__all__ = ["BackgroundServer", "Limits", "Registry", "ServedVector", "alert_threshold", "create_app"]
