from persona_agent.optimizers.acceptance import (ACCEPTANCE, AcceptValid, Acceptance, ConsistentImprovement, Outcome,
                                                 StrictImprovement, TieBreakByAgreement)
from persona_agent.optimizers.persona_alignment import AlignmentStep, PersonaAlignment

__all__ = ["ACCEPTANCE", "AcceptValid", "Acceptance", "AlignmentStep", "ConsistentImprovement", "Outcome",
           "PersonaAlignment", "StrictImprovement", "TieBreakByAgreement"]
