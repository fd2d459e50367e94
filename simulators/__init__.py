"""Physics-backed stand-ins for hot-lab devices, speaking the real wire protocols."""
