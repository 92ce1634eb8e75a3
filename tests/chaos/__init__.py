"""Fault-injection and load scenarios (issue 6).

Short form by default; the full sizes with MAILPOOL_CHAOS=full (``make chaos``).
"""
