"""Running tickpipe: service status, metrics, query history, and the Redis ``make run`` owns."""
