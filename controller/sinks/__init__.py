"""Sinks: where committed messages go (MQTT, InfluxDB, the history archive); each acknowledges to the outbox."""
