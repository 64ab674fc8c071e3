"""Development tools: tiny and real-shape random models, loopback services, bench, demo.

The production path (``worker.app``, the ``worker`` command) never imports this package;
a test holds it to that.
"""
