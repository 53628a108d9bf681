"""The behaviour suite runs every test against both Queue implementations.

``make_any_queue(**options)`` (in tests/conftest.py) builds a ``Queue`` on the
test database (through the ``make_queue`` fixture) or a
``pyqueue.testing.MemoryQueue``, so that the two cannot drift apart. Only
options both accept belong here: concurrency, shutdown_grace.
"""
