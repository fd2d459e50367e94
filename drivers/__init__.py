"""Async device drivers: dose calibrators (serial) and generator elution stations (Modbus)."""
