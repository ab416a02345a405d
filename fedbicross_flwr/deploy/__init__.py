"""Deployment helpers: the SuperLink gate that keeps the operator's APIs (Control, Runtime)
closed to the sites (:mod:`.superlink_gate`, run as
``python -m fedbicross_flwr.deploy.superlink_gate``).
"""
