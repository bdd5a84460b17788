"""The control plane: a Unix-socket server in the daemon and the ``flowerpowerctl`` client.

``protocol`` is shared by both sides and imports nothing but the standard
library and orjson, so ``flowerpowerctl`` starts fast. This package imports
nothing on its own.
"""
