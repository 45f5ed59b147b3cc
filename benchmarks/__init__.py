"""Benchmarks: facility location against its peers, service overhead, and time to accuracy (``crest bench train``).

Each ``benchmarks/NAME.py`` also runs as a script (``python benchmarks/NAME.py --help``).
"""
