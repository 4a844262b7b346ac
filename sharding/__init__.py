"""The sparse operation kit: sharded embedding tables across ranks (planner and runtime).

Usable on its own; it never imports distrec.
"""
