"""Built-in adapters: one small plugin module per architecture family.

Each module is registered through the ``anylens`` entry-point group, exactly like a third-party
plugin, and implements the ``anylens_adapters`` hook.
"""
