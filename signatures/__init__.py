"""DSPy signatures: small declarative classes whose docstring is the instruction."""

from persona_agent.signatures.alignment import CritiqueBatch, CritiqueResponse, UpdateProfile
from persona_agent.signatures.answer import PlainAnswer, TaskAnswer, typed_to
from persona_agent.signatures.memory_query import FormulateMemoryQuery
from persona_agent.signatures.profile import SummarizeProfile, typed_profile

__all__ = ["CritiqueBatch", "CritiqueResponse", "FormulateMemoryQuery", "PlainAnswer", "SummarizeProfile", "TaskAnswer",
           "UpdateProfile", "typed_profile", "typed_to"]
