"""DSPy signatures: small declarative classes whose docstring is the instruction."""

from .alignment import CritiqueBatch, CritiqueResponse, UpdateProfile
from .answer import PlainAnswer, TaskAnswer, typed_to
from .memory_query import FormulateMemoryQuery
from .profile import SummarizeProfile, typed_profile

__all__ = ["CritiqueBatch", "CritiqueResponse", "FormulateMemoryQuery", "PlainAnswer", "SummarizeProfile", "TaskAnswer",
           "UpdateProfile", "typed_profile", "typed_to"]
