"""Statistics over a batch of sensor readings (no pandas needed)."""


def count(readings: list[float]) -> int:
    """How many readings arrived."""
    return len(readings)


def mean(readings: list[float], count: int) -> float:
    """Arithmetic mean of the readings."""
    return sum(readings) / count if count else 0.0


def minimum(readings: list[float]) -> float:
    """Lowest reading."""
    return min(readings)


def maximum(readings: list[float]) -> float:
    """Highest reading."""
    return max(readings)


def alert(maximum: float, threshold: float) -> bool:
    """True when any reading went above the threshold."""
    return maximum > threshold
