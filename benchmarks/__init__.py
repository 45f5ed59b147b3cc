"""Benchmarks: facility location against its peers, service overhead, and time to accuracy (``crest bench train``).

Installed as ``crest_bench`` (the folder is ``benchmarks/``). It is the top of the package graph: it imports
both sides (``selector_service``, ``trainer_client``) and the wire package ``crest``, and nothing but tests and
examples imports it. Every benchmark runs as ``crest bench NAME`` (``crest bench --help``); ``cli.py`` is the
``crest`` command itself.
"""
