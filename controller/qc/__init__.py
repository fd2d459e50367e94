"""Decay-corrected quality control of dose calibrators, generators and patient dosages.

`limits` holds the acceptance limits and their sources, `result` the verdict type, the
`*_rules` modules and `dosage` the pure rule functions, and `engine` the streaming engine
the controller runs on every message. See docs/qc.md.
"""
