"""Tick sources and the tickerplant that validates, sequences and publishes their ticks."""
