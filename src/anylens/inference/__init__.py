"""Adapters inferred from a model's structure, verified before use.

:mod:`.probe` records the calls of plain forward passes; :mod:`.structure` and :mod:`.anatomy`
read the layer stack, the residual stream, attention, MLP and norms from them; :mod:`.heads` and
:mod:`.attention_ops` find the per-head layouts and the attention-pattern operation; :mod:`.infer`
turns the anatomy into candidate adapters and keeps the first that passes ``anylens check``.
The built-in plugin :mod:`anylens.adapters.inferred` serves it to the registry.
"""
