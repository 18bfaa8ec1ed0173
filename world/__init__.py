"""The built-in world: synthetic data in the real layouts, tiny models and stand-in servers.

Fixtures beside the core, for the demo, the tests and the benchmarks: nothing here is downloaded.
The stages never import it.
"""
