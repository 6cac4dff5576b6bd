"""The operator console (issue 20): a web console on an admin listener of its own that
shows the relay live, with nothing personal beyond what the policy lets an operator see.
"""
