"""The broker: the one process that knows which workers exist and routes requests to them."""
