# Stub of the compiled fastxent._xla_ffi (cpp/ffi/module.cpp), present only when fastxent was
# built with jaxlib's XLA FFI headers.
from typing import Any, Dict, Tuple

jaxlib_version: str
api_version: Tuple[int, int]

def handlers() -> Dict[str, Any]: ...
