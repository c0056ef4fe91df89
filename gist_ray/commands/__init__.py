"""The commands on the driver: train, cache-guide, init, eval, mine."""
