"""Opcodes that push a literal from the pickle: ints, floats, strings, bytes, None and bools.

A mixin of the machine: each handler reads its argument at ``pos`` (just past the opcode), pushes
one value and returns where the next opcode starts. Every length a pickle declares is checked
against the data before anything is allocated, and text integers are bounded before ``int()``
(quadratic in the digits) sees them.
"""

from __future__ import annotations

import codecs
import re
import struct
from typing import Any

from ckptkit.pickle.entries import Malformed

_I32 = struct.Struct("<i")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct(">d")
_NEWLINE = re.compile(b"\n")
_MAX_DIGITS = 4300


class Literals:
    """Literal opcodes over the machine's input (``buf``, ``size``) and value ``stack``."""

    buf: bytes | bytearray | memoryview
    size: int
    stack: list[Any]

    def _end(self, pos: int, length: int) -> int:
        """Where ``length`` bytes from ``pos`` end; Malformed before allocating if past the data."""
        if length > self.size - pos:
            raise Malformed(f"declared length {length} runs past the end of the data")
        return pos + length

    def _line(self, pos: int) -> tuple[bytes, int]:
        """The text opcodes' argument: bytes up to the newline, and the position after it."""
        match = _NEWLINE.search(self.buf, pos)
        if match is None:
            raise Malformed("data ends inside a text argument (no newline)")
        end = match.start()
        return bytes(self.buf[pos:end]), end + 1

    def _int(self, line: bytes, base: int = 10) -> int:
        """A text opcode's integer; long literals are refused before int() (quadratic) sees them.

        CPython itself refuses more than 4300 digits (``sys.set_int_max_str_digits``).
        """
        if len(line) > _MAX_DIGITS:
            raise Malformed(f"integer literal of {len(line)} characters")
        return int(line, base)

    def _op_none(self, pos: int) -> int:
        self.stack.append(None)
        return pos

    def _op_newtrue(self, pos: int) -> int:
        self.stack.append(True)
        return pos

    def _op_newfalse(self, pos: int) -> int:
        self.stack.append(False)
        return pos

    def _op_int(self, pos: int) -> int:
        line, pos = self._line(pos)
        # Protocol 0 spells booleans as INT 00 / 01.
        self.stack.append(False if line == b"00" else True if line == b"01" else self._int(line, 0))
        return pos

    def _op_binint(self, pos: int) -> int:
        self.stack.append(_I32.unpack_from(self.buf, pos)[0])
        return pos + 4

    def _op_binint1(self, pos: int) -> int:
        self.stack.append(self.buf[pos])
        return pos + 1

    def _op_binint2(self, pos: int) -> int:
        self.stack.append(_U16.unpack_from(self.buf, pos)[0])
        return pos + 2

    def _op_long(self, pos: int) -> int:
        line, pos = self._line(pos)
        self.stack.append(self._int(line[:-1] if line.endswith(b"L") else line, 0))
        return pos

    def _op_long1(self, pos: int) -> int:
        end = self._end(pos + 1, self.buf[pos])
        self.stack.append(int.from_bytes(self.buf[pos + 1 : end], "little", signed=True))
        return end

    def _op_long4(self, pos: int) -> int:
        (length,) = _I32.unpack_from(self.buf, pos)
        if length < 0:
            raise Malformed("negative LONG4 length")
        end = self._end(pos + 4, length)
        self.stack.append(int.from_bytes(self.buf[pos + 4 : end], "little", signed=True))
        return end

    def _op_float(self, pos: int) -> int:
        line, pos = self._line(pos)
        self.stack.append(float(line))
        return pos

    def _op_binfloat(self, pos: int) -> int:
        self.stack.append(_F64.unpack_from(self.buf, pos)[0])
        return pos + 8

    # --- strings and bytes ---------------------------------------------------------------

    def _push_string(self, raw: bytes) -> None:
        # Python 2 str: text if it is ASCII (what Unpickler's default encoding accepts), else
        # the bytes themselves; guessing a codec would invent characters.
        self.stack.append(raw.decode("ascii") if raw.isascii() else raw)

    def _op_string(self, pos: int) -> int:
        line, pos = self._line(pos)
        if len(line) < 2 or line[0] != line[-1] or line[0] not in b"\"'":
            raise Malformed("the STRING argument must be quoted")
        self._push_string(codecs.escape_decode(line[1:-1])[0])
        return pos

    def _op_binstring(self, pos: int) -> int:
        (length,) = _I32.unpack_from(self.buf, pos)
        if length < 0:
            raise Malformed("negative BINSTRING length")
        end = self._end(pos + 4, length)
        self._push_string(bytes(self.buf[pos + 4 : end]))
        return end

    def _op_short_binstring(self, pos: int) -> int:
        end = self._end(pos + 1, self.buf[pos])
        self._push_string(bytes(self.buf[pos + 1 : end]))
        return end

    def _op_unicode(self, pos: int) -> int:
        line, pos = self._line(pos)
        self.stack.append(str(line, "raw-unicode-escape"))
        return pos

    def _unicode(self, pos: int, length: int) -> int:
        end = self._end(pos, length)
        self.stack.append(str(self.buf[pos:end], "utf-8", "surrogatepass"))
        return end

    def _op_short_binunicode(self, pos: int) -> int:
        end = pos + 1 + self.buf[pos]
        if end > self.size:
            raise Malformed("declared length runs past the end of the data")
        self.stack.append(str(self.buf[pos + 1 : end], "utf-8", "surrogatepass"))
        return end

    def _op_binunicode(self, pos: int) -> int:
        end = pos + 4 + _U32.unpack_from(self.buf, pos)[0]
        if end > self.size:
            raise Malformed("declared length runs past the end of the data")
        self.stack.append(str(self.buf[pos + 4 : end], "utf-8", "surrogatepass"))
        return end

    def _op_binunicode8(self, pos: int) -> int:
        return self._unicode(pos + 8, _U64.unpack_from(self.buf, pos)[0])

    def _bytes(self, pos: int, length: int) -> int:
        end = self._end(pos, length)
        self.stack.append(bytes(self.buf[pos:end]))
        return end

    def _op_short_binbytes(self, pos: int) -> int:
        return self._bytes(pos + 1, self.buf[pos])

    def _op_binbytes(self, pos: int) -> int:
        return self._bytes(pos + 4, _U32.unpack_from(self.buf, pos)[0])

    def _op_binbytes8(self, pos: int) -> int:
        return self._bytes(pos + 8, _U64.unpack_from(self.buf, pos)[0])

    def _op_bytearray8(self, pos: int) -> int:
        end = self._end(pos + 8, _U64.unpack_from(self.buf, pos)[0])
        self.stack.append(bytearray(self.buf[pos + 8 : end]))
        return end
