"""The catch-up path: a backlog of missed events (store, unrecorded log, Redis) handed to live."""
