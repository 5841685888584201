"""Local sample upstreams and test helpers shipped with the gateway.

The fake Inkeep, Nuclia and analytics servers speak the real wire formats; the test suite and
``gateway serve --demo`` both use them. ``configs`` builds gateway configs and ``process``
runs ``gateway serve`` as a child process, for the tests and the benchmark. Nothing here is on
the request path of a real gateway.
"""
