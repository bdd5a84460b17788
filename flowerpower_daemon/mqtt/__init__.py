"""The MQTT side: the link (connection, manual acks, intake bound), the outbox of
results waiting for the broker, the result sinks, and the embedded broker.

The only place besides ``sources.mqtt`` (topics and payloads) that knows MQTT.
"""
