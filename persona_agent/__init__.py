"""persona-agent: per-user personas for DSPy agents, aligned to each user at test time.

Importing it keeps the libraries it drives offline (`settings.offline_environment`: no MLflow
telemetry, no price list or model hub fetched), unless the environment says otherwise: import it
before MLflow, DSPy or `datasets`, whose imports read those settings.
"""

from persona_agent.settings import offline_environment

offline_environment()
