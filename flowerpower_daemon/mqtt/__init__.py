"""The MQTT side: the link (link.py: connection, reconnects, publish; intake.py: manual
acks and the intake bound; client.py: the one module using aiomqtt and paho), the
outbox of results waiting for the broker, the result sinks, and the embedded broker.

The only place besides ``sources.mqtt`` (topics and payloads) that knows MQTT.
"""
