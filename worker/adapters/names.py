"""What the adapter store accepts as names and sizes, in one place.

The store (format.py, store.py) and the AdapterSet CRD (operator/crds.py)
must agree on which adapters exist: an AdapterSet describes an adapter in
the store, so a name, task or rank one of them admits and the other refuses
is an adapter that cannot be served or cannot be described. Both read these
constants. This module imports nothing heavy (no torch), so printing the
CRDs stays fast.

`NAME` is written for both regular-expression engines that read it:
Python's `re` (the store, with `fullmatch`) and RE2 (the Kubernetes API
server's OpenAPI `pattern` and CEL `matches`). It is anchored at both ends
and uses only ASCII classes: `$` and `\\w` mean different things in the two.
"""

from __future__ import annotations

import re
from typing import TypeGuard

# Names end up in Redis keys and part names; keep them to a safe alphabet
# (no '.': names are also torch module keys). At most 63 characters.
NAME = r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$"
MAX_NAME = 63

# Bounds on what an adapter spec may declare. A spec sizes loops and
# allocations (tensor names, parts, stacked heads), so an absurd one must
# fail before them. Models we serve have at most a few hundred layers; a
# plain-LoRA baseline as large as a multi-task set may need a large rank.
MAX_LAYERS = 256
MAX_TASKS = 64
MAX_RANK = 4096
MAX_TEXT = 253  # the base model's name, as long as a Kubernetes name

# A version a worker is asked to load: empty (the current one) or a positive
# integer of at most 18 digits (any such number fits an int64).
ADAPTER_VERSION = r"^(0*[1-9][0-9]*)?$"
MAX_VERSION_DIGITS = 18

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + FFN_MODULES

_NAME = re.compile(NAME)
_VERSION = re.compile(ADAPTER_VERSION)


def is_valid_name(name: object) -> TypeGuard[str]:
    """Whether `name` is a valid adapter or task name. A whole-string match:
    `re.match` with `$` would also take a name ending in a newline, which
    RE2 (the API server) refuses."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def is_valid_version(version: str) -> bool:
    """Whether `version` names a version a worker may load ('' is the current one)."""
    return len(version) <= MAX_VERSION_DIGITS and _VERSION.fullmatch(version) is not None
