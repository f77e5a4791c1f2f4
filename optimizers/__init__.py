from .persona_alignment import AlignmentStep, PersonaAlignment

__all__ = ["AlignmentStep", "PersonaAlignment"]
