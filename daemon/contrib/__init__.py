"""Integrations with other frameworks, each behind its own extra (pip install 'stoker[NAME]'):
nothing here is imported by the daemon unless its configuration asks for it."""
