"""The ``nucleo`` command: one module per command group, one shared helpers module.

Building the parser imports no torch (``nucleo --help`` is instant); each command imports what
it needs when it runs.
"""
