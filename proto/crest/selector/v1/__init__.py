"""Version 1 of the selection-service wire contract.

``selector_pb2*`` are generated from ``selector.proto`` by ``proto/generate.py`` and never edited by hand;
``codec`` packs and unpacks the numpy arrays that travel in ``bytes`` fields; ``settings`` is a session's selection
settings; ``api`` is the interface a trainer calls, whichever transport carries it (gRPC, or in process).
"""
