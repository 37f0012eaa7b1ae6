"""The broker: the one process that knows which workers exist and routes requests to them (broker.py, a relay
that does not open what it carries); beside it the policies it consults: which lane (lanes.py), which
models are loaded (models.py) and which worker processes run (lives.py)."""
