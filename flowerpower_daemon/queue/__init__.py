"""Running requests through taskiq: the broker factory and the one task, the Redis
stream broker, and the thread pool sync pipelines run in."""
