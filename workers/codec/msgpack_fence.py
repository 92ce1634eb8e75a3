"""What the wire codec relies on of msgpack-python beyond its documented API, in one place.

Checked against msgpack 1.2.4 (the release CI installs) and 1.0.5 (pyproject's floor, the
lowest-deps run): ``CHECKED_RELEASES``.  tests/test_internals_msgpack.py fails, naming this
file, on a release outside that range or when the C unpacker no longer behaves as below;
check both facts against that release's ``msgpack/unpack_template.h`` and
``msgpack/_unpacker.pyx``, then widen the range.

Pure like the rest of the codec: no I/O, only facts about the decoder.

* :data:`UNPACKER_STACK`: the C unpacker keeps a stack of 1024 containers
  (``_MSGPACK_EMBED_STACK_SIZE``) and raises ``StackError`` past it, whatever
  ``max_depth`` the caller configured.  What it buys: wire.py reports that error as
  "nesting deeper than 1024 levels", the same clear ``WireError`` as its own depth limit
  (test_internals_msgpack::test_the_c_unpacker_stack_holds_1024_levels).  The pure-Python
  fallback has no such stack: the test also checks that the C extension is the one in use.
* :func:`is_ext_refusal`: an ext type refused by ``max_ext_len=0`` is a ``ValueError``
  whose text names ``max_ext_len`` (msgpack documents the option, not the wording).  What it
  buys: "msgpack ext types are not allowed" instead of the C decoder's
  "4 exceeds max_ext_len(0)"
  (test_internals_msgpack::test_an_ext_refused_by_max_ext_len_is_recognised,
  test_codec_hostile_parse).
"""

from __future__ import annotations

CHECKED_RELEASES = ">=1.0.5,<2"

# msgpack 1.0.5-1.2.4: unpack_template.h's stack (_MSGPACK_EMBED_STACK_SIZE = 1024).
UNPACKER_STACK = 1024


def is_ext_refusal(error: Exception) -> bool:
    """True when ``error`` is the C decoder refusing an ext type (``max_ext_len=0``)."""
    return "max_ext_len" in str(error)
