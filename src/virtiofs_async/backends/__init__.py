"""Ready-made backends."""
from .memory import MemoryFS

__all__ = ["MemoryFS"]
