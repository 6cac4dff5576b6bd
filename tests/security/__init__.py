"""Regression tests for the outside audit's findings (issue 14): one module per class
of attack, against a real `softrelay serve` where the attack needed one."""
