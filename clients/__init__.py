"""The Flower ClientApp (`clients.app`), the client it runs as and what a node keeps between
rounds; the package loads fedlora's bytecode cache first (`fedlora.bytecode_cache`)."""

from fedlora.bytecode_cache import use_bytecode_cache

use_bytecode_cache()  # before torch: hosts whose torch ships no bytecode
