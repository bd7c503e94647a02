"""`personascope serve`: an OpenAI-compatible server that steers and monitors persona traits per request."""

from personascope.serve.app import create_app
from personascope.serve.background import BackgroundServer
from personascope.serve.protocol import Limits
from personascope.serve.registry import Registry, ServedVector, alert_threshold

__all__ = ["BackgroundServer", "Limits", "Registry", "ServedVector", "alert_threshold", "create_app"]
