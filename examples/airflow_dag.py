"""Airflow DAG: ingest yesterday's events, then re-align the users they touched, every night.

Copy into your Airflow `dags/` folder and set PERSONA_AGENT_STORE, PERSONA_AGENT_EVENTS and
(for a remote LLM) PERSONA_AGENT_LM / PERSONA_AGENT_API_BASE plus the provider's key variable.
`nightly` is resumable and refuses to run twice on one store, so Airflow retries are safe.
"""

import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

STORE = os.environ.get("PERSONA_AGENT_STORE", "/srv/persona-agent/mlruns")
EVENTS = os.environ.get("PERSONA_AGENT_EVENTS", "/srv/persona-agent/events/{{ ds }}.jsonl")
LM = os.environ.get("PERSONA_AGENT_LM", "local")
API_BASE = os.environ.get("PERSONA_AGENT_API_BASE")
lm_args = f"--lm {LM}" + (f" --api-base {API_BASE}" if API_BASE else "")

with DAG(
    dag_id="persona_agent_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
) as dag:
    ingest = BashOperator(task_id="ingest", bash_command=f"persona-agent ingest {EVENTS} --store {STORE}")
    nightly = BashOperator(task_id="nightly", bash_command=f"persona-agent nightly --store {STORE} {lm_args} --workers 16")
    ingest >> nightly
