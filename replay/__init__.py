"""Replay service: actors insert experience into shards, learners sample it back.

Place in the data flow: actors (replay/insert.py) -> shards (replay/server.py, one
`canopy replay` process each) -> learners (replay/sample.py); every message between them
is defined in replay/protocol.py.
"""
