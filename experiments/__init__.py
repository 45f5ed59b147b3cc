"""The project's own studies: harnesses that tuned and audited the selection, run from a checkout.

    python -m experiments.frontier --quick     # the budget frontier: every method at a sweep of budgets
    python -m experiments.staleness --quick    # how a candidate embedding's age changes the coresets
    python -m experiments.offload --quick      # the embedding pass on a second core (measured, rejected)

Neither installed nor copied into the images: the product's benchmarks, what a user runs on their own machine,
are ``crest bench`` (``crest_bench``). These import the product and ``crest_bench`` (never the reverse), and
their tests run in CI (``tests/test_bench_frontier.py``, ``tests/test_benchmarks.py``). Their committed results
are under ``benchmarks/results/``; the rounds of tuning they served are ``docs/research/``.
"""
