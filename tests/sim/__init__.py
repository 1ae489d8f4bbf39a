"""The Flatcar simulation kit used by the integration tests, the demo and the benchmarks.

``from sim.kit import Kit`` (``tests`` is on ``sys.path``); see ``tests/sim/README.md``.
"""
