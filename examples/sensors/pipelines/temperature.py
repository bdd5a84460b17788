"""Convert one temperature reading from a device and flag it against a threshold."""


def celsius(temperature: float) -> float:
    """The reading, in degrees Celsius."""
    return float(temperature)


def fahrenheit(celsius: float) -> float:
    """The reading, in degrees Fahrenheit."""
    return celsius * 9.0 / 5.0 + 32.0


def too_hot(celsius: float, threshold: float = 30.0) -> bool:
    """True when the reading is above the threshold."""
    return celsius > threshold


def device_id(device: str = "unknown") -> str:
    """The device that sent the reading (the `{device}` level of the MQTT topic)."""
    return device
