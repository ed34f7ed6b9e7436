"""HTTP routes and the WebSocket endpoint: where tickpipe speaks to its users."""
