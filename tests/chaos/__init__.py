"""Fault-injection and load scenarios: ingest and delivery under Redis faults, relay faults,
hostile input, churn and memory pressure, with a ledger of what was accepted and delivered.

Short form by default; the full sizes with MAILPOOL_CHAOS=full (``make chaos``).
"""
