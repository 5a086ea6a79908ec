"""A small Django project whose tasks Stoker runs (tests/test_django.py, Python >= 3.12)."""
