"""Development tools for tests and benchmarks: a stand-in inference app server (``upstream``)."""
