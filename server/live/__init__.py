"""The live path: the Redis bus the feed publishes into, and the hub that fans it out to sockets."""
