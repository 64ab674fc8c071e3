"""The model side: the engine interface, today's ``generate`` engine, loading, catalogue.

Nothing here is imported by ``import worker``; torch and transformers load only when a
worker (or a local caption, or the benchmark) builds an engine.
"""
