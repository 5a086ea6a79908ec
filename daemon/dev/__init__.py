"""Development only: a throwaway PostgreSQL cluster for `make run` and the tests (pgcluster.py)."""
