"""Helpers, fakes and factories shared by the test modules.

Test modules import from here and never from one another; pytest fixtures stay in `tests/conftest.py`.
"""
