from persona_agent.optimizers.persona_alignment import AlignmentStep, PersonaAlignment

__all__ = ["AlignmentStep", "PersonaAlignment"]
