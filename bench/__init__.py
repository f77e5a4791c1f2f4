"""Scripts that print numbers (`python bench/NAME.py`). Two of them are also tools the tests use as
modules, by name: `bench.fake_llm_server` (an OpenAI-compatible endpoint that fails on request) and
`bench.pg_server` (PostgreSQL and `mlflow server` on free local ports). Not installed with the
package; importable from the repository root, where pytest runs."""
