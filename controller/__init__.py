"""hotlab controller: configuration, supervision, MQTT, QC, durable outbox, InfluxDB, CLI."""
