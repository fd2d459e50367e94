"""The bottom layer: activity units, nuclide data with sources, decay maths and UTC time.

It imports nothing of hotlab's but the root error type, so drivers, simulators and the
controller can all build on it without depending on one another.
"""
