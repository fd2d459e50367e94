"""The simulated lab and the demo: simulators, a private broker and an operator, wired to a real controller."""
