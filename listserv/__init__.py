"""listserv: a mailing-list discussion server (receive -> decide -> deliver -> archive)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
