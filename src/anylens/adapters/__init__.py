"""Built-in adapters: one small plugin module per architecture family.

Each module is named in :data:`anylens.registry.builtin.BUILTIN_PLUGINS` and registered through
the same call as a third-party plugin of the ``anylens`` entry-point group; it implements the
``anylens_adapters`` hook. Adapters import only the core and the public ``anylens`` API, as a
third-party plugin does.
"""
