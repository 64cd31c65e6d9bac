"""Decode chosen fields of Avro records with a compiled walker (numba).

The readers need about twenty fields of an alert: its ids, a few fields of
the candidate and the three cutouts. fastavro decodes them with a reader
schema that leaves the rest out, but it still steps through every skipped
field in interpreted code (a ZTF packet's ``prv_candidates`` alone holds
about a thousand), which makes decoding the slowest step of reading.

Here a writer schema is compiled once into flat tables (one node per Avro
type, one entry per record field), and a jitted function (:func:`_walk`)
walks a record's bytes by those tables, noting where each wanted field
starts and ends; a second one (:func:`_leaves`) decodes the wanted numbers
and finds the wanted strings, and Python builds the dict from them (and
decodes the few wanted values of other types). The result is the dict that
``fastavro.schemaless_reader(fo, writer, reader)`` returns for the reader
schema that :func:`~sk_covvae.datasets._readers._project` builds (tests check
this on every shipped packet). Schemas with features the walker does not
cover (logical types among the wanted fields, unions of several records on
the way to a wanted field) get no plan, and their records go through
fastavro as before; so do all records when numba is not installed.

Avro's binary encoding (the specification, "Binary Encoding"): ``int`` and
``long`` are zig-zag varints; ``float`` and ``double`` are 4 and 8 bytes;
``bytes`` and ``string`` a long length then the data; ``fixed`` its size;
``enum`` and a union's branch a long index; records their fields in order;
arrays and maps blocks of a long count (negative: followed by the block's
size in bytes) ending with a zero count, map entries being a string key
then a value.
"""

import functools
import struct
import types

import numpy as np

# Node kinds of the compiled tables.
_NULL, _BOOLEAN, _LONG, _FLOAT, _DOUBLE, _BYTES = 0, 1, 2, 3, 4, 5
_FIXED, _ENUM, _RECORD, _ARRAY, _MAP, _UNION = 6, 7, 8, 9, 10, 11
_PRIMITIVES = {
    "null": _NULL,
    "boolean": _BOOLEAN,
    "int": _LONG,
    "long": _LONG,
    "float": _FLOAT,
    "double": _DOUBLE,
    "bytes": _BYTES,
    "string": _BYTES,
}

_RECORDS = ("record", "error")
# How a wanted field is decoded: whole by a Python reader, as a record of
# wanted fields, as a union whose branches are one or the other, or (a
# primitive, or null and a primitive) by _leaves.
_LEAF, _SUB, _UNION_SUB, _PRIMITIVE = 0, 1, 2, 3
_FLOATS = frozenset(("float", "double"))

#: Returned by the walker for data that do not fit the schema.
_CORRUPT = -1


class _Unsupported(Exception):
    """The schema needs something the walker does not do (use fastavro)."""


# --------------------------------------------------------------------------
# the jitted walker
# --------------------------------------------------------------------------


def _read_long(buf, pos, end):
    """(value, next position) of a zig-zag varint; position -1 if cut off."""
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            return 0, _CORRUPT
        b = int(buf[pos])  # not a uint8: the shifts below need 64 bits
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    # a logical shift: compiled, ``result`` is an int64, negative for the
    # zig-zag codes of longs of magnitude 2**62 and more
    return ((result >> 1) & 0x7FFFFFFFFFFFFFFF) ^ -(result & 1), pos


def _walk(buf, pos, end, node, nodes, fields, out):
    """Position after the value of type ``node`` that starts at ``pos``.

    ``nodes[i]`` is ``(kind, arg, first, count)`` of type ``i``; a record's
    fields and a union's branches are ``fields[first : first + count]``,
    each ``(type, slot)``. Fields with a slot >= 0 write ``(start, stop)``
    to ``out[slot]``. Returns -1 when the data run past ``end`` or do not
    fit the schema.
    Iterative (a stack of open records, arrays and maps), plain Python
    here; :func:`_jitted` compiles it, and the tests also run it as it is.
    """
    start = pos
    depth = 64
    stack = np.zeros((depth, 3), dtype=np.int64)  # node, next field, items left
    sp = 0
    while True:
        # enter a value of type ``node`` at ``pos``
        while True:
            k = nodes[node, 0]
            if k == 11:  # union: the branch index, then the branch
                branch, pos = _read_long(buf, pos, end)
                if pos < 0 or branch < 0 or branch >= nodes[node, 3]:
                    return _CORRUPT
                node = fields[nodes[node, 2] + branch, 0]
                continue
            break
        if k == 8 or k == 9 or k == 10:  # record, array, map: open a frame
            if sp == depth:  # deeper: a larger stack
                # Records nest in records at most once per record type unless
                # a union (one byte at least) lies between: a stack deeper
                # than that means a type that holds itself and no data end.
                if depth > pos - start + len(nodes):
                    return _CORRUPT
                larger = np.zeros((2 * depth, 3), dtype=np.int64)
                larger[:depth] = stack
                stack = larger
                depth *= 2
            stack[sp, 0] = node
            stack[sp, 1] = nodes[node, 2]
            stack[sp, 2] = 0
            sp += 1
        elif k == 1:  # boolean
            pos += 1
        elif k == 2:  # int, long
            _, pos = _read_long(buf, pos, end)
        elif k == 7:  # enum: an index among ``arg`` symbols
            index, pos = _read_long(buf, pos, end)
            if index < 0 or index >= nodes[node, 1]:
                return _CORRUPT
        elif k == 3:  # float
            pos += 4
        elif k == 4:  # double
            pos += 8
        elif k == 5:  # bytes, string
            n, pos = _read_long(buf, pos, end)
            if n < 0:
                return _CORRUPT
            pos += n
        elif k == 6:  # fixed
            pos += nodes[node, 1]
        if pos < 0 or pos > end:
            return _CORRUPT
        # resume the open frames until one has a value to enter
        entered = False
        while sp > 0 and not entered:
            top = sp - 1
            frame = stack[top, 0]
            fk = nodes[frame, 0]
            if fk == 8:  # record
                j = stack[top, 1]
                first = nodes[frame, 2]
                if j > first and fields[j - 1, 1] >= 0:  # field j - 1 is done
                    out[fields[j - 1, 1], 1] = pos
                if j == first + nodes[frame, 3]:
                    sp -= 1
                    continue
                if fields[j, 1] >= 0:
                    out[fields[j, 1], 0] = pos
                stack[top, 1] = j + 1
                node = fields[j, 0]
                entered = True
            else:  # array or map
                if stack[top, 2] == 0:  # a new block
                    n, pos = _read_long(buf, pos, end)
                    if pos < 0:
                        return _CORRUPT
                    if n == 0:
                        sp -= 1
                        continue
                    if n < 0:  # the count is followed by the block's size
                        size, pos = _read_long(buf, pos, end)
                        if pos < 0 or size < 0 or pos + size > end:
                            return _CORRUPT
                        pos += size  # no wanted field lies inside
                        continue
                    stack[top, 2] = n
                stack[top, 2] -= 1
                if fk == 10:  # a map entry's key
                    n, pos = _read_long(buf, pos, end)
                    if pos < 0 or n < 0 or pos + n > end:
                        return _CORRUPT
                    pos += n
                node = nodes[frame, 1]
                entered = True
        if not entered:
            return pos


def _leaves(buf, out, kinds, nulls, ints, floats, flags):
    """Decode the wanted fields of primitive type once ``_walk`` has found them.

    For every slot with ``kinds[slot] > 0`` (a primitive, or the union of it
    and null whose null branch is ``nulls[slot]``): ``flags[slot]`` is 1 for
    null, 2 for a field not met (in a union branch not taken), else 0 and
    the value is in ``ints`` (long, int, boolean; for string and bytes the
    position where the content starts, which ends at ``out[slot, 1]``) or
    ``floats`` (float, double). The walker has checked every length.
    """
    wide = np.empty(1, dtype=np.uint64)
    narrow = np.empty(1, dtype=np.uint32)
    for slot in range(len(kinds)):
        k = kinds[slot]
        if k == 0:
            continue
        pos = out[slot, 0]
        if pos < 0:
            flags[slot] = 2
            continue
        end = out[slot, 1]
        if nulls[slot] >= 0:
            branch, pos = _read_long(buf, pos, end)
            if branch == nulls[slot]:
                flags[slot] = 1
                continue
        flags[slot] = 0
        if k == 2:  # int, long
            ints[slot], pos = _read_long(buf, pos, end)
        elif k == 1:  # boolean
            ints[slot] = buf[pos] != 0
        elif k == 4:  # double: 8 bytes, little-endian
            u = np.uint64(0)
            for i in range(8):
                u |= np.uint64(buf[pos + i]) << np.uint64(8 * i)
            wide[0] = u
            floats[slot] = wide.view(np.float64)[0]
        elif k == 3:  # float: 4 bytes
            v = np.uint32(0)
            for i in range(4):
                v |= np.uint32(buf[pos + i]) << np.uint32(8 * i)
            narrow[0] = v
            floats[slot] = narrow.view(np.float32)[0]
        else:  # bytes, string: the length, then the content
            n, pos = _read_long(buf, pos, end)
            ints[slot] = pos


def _walk_block(buf, pos, end, count, node, nodes, fields, tables, stops):
    """Walk and decode ``count`` records in a row from ``pos``.

    ``tables`` are ``(out, kinds, nulls, ints, floats, flags)`` with one
    row of ``out``, ``ints``, ``floats`` and ``flags`` per record (``out``
    filled with -1), as :func:`_walk` and :func:`_leaves` use them;
    ``stops[r]`` gets the position after record ``r``. Returns the number of
    records that fit the schema (``count`` unless one does not).
    One call per block of a container file: no Python between records.
    """
    out, kinds, nulls, ints, floats, flags = tables
    for r in range(count):
        pos = _walk(buf, pos, end, node, nodes, fields, out[r])
        if pos < 0:
            return r
        _leaves(buf, out[r], kinds, nulls, ints[r], floats[r], flags[r])
        stops[r] = pos
    return count


#: Bytes of a container file read at once by RecordDecoder.container_records.
_CHUNK = 1 << 23
#: Records of a walk built into dicts at once. Building holds the GIL while
#: the consumer of the records (gunzip) lets it go: in small groups, a thread
#: that scores beside the reader never waits long for it.
_BUILD_AT_ONCE = 8
# Why _walk_blocks stopped early (``state[0]``).
_BAD_HEADER, _CUT_HEADER, _CUT_BLOCK, _BAD_SYNC, _BAD_RECORD = 1, 2, 3, 4, 5
_BLOCK_ERRORS = {
    "_BAD_HEADER": _BAD_HEADER,
    "_CUT_HEADER": _CUT_HEADER,
    "_CUT_BLOCK": _CUT_BLOCK,
    "_BAD_SYNC": _BAD_SYNC,
    "_BAD_RECORD": _BAD_RECORD,
}
#: The error of a record that does not fit its schema.
_DOES_NOT_FIT = "Avro record does not fit its schema (corrupt or cut off)"


def _walk_blocks(
    buf, end, at_end, sync, limit, node, nodes, fields, tables, stops, state
):
    """Walk and decode the records of a container file's blocks (codec null).

    Up to ``limit`` records from ``state[1]``, into the rows of ``tables``
    and ``stops`` as :func:`_walk_block` does; returns how many. Each block
    is a count, a size, the records, then ``sync`` (16 bytes). ``buf`` holds
    the file's bytes up to ``end``, the end of the file when ``at_end``;
    otherwise a block is begun only when it and its sync marker are there,
    so that the walk stops between blocks. ``state`` (int64) carries
    ``(error, position, records left in the block, end of the block)`` from
    call to call, and ``state[4:6]`` the size and the bytes present of a
    block cut off; ``error`` is one of the codes above (0: none). A block
    header or block that ``buf`` cuts off stops the walk at its start.
    """
    out, kinds, nulls, ints, floats, flags = tables
    pos, left, block_end = state[1], state[2], state[3]
    r = 0
    while r < limit and state[0] == 0:
        if left == 0:
            if pos >= end:
                break
            count, p = _read_long(buf, pos, end)
            if p < 0 or (p >= end and not at_end):
                state[0] = _CUT_HEADER
                break
            if p >= end:
                state[0] = _BAD_HEADER
                break
            size, p = _read_long(buf, p, end)
            if p < 0:
                state[0] = _CUT_HEADER
                break
            if count < 0 or size < 0:
                state[0] = _BAD_HEADER
                break
            if p + size > end or (p + size + 16 > end and not at_end):
                state[0] = _CUT_BLOCK
                state[4] = size
                state[5] = end - p
                break
            pos, left, block_end = p, count, p + size
        if left > 0:
            stop = _walk(buf, pos, block_end, node, nodes, fields, out[r])
            if stop < 0:
                state[0] = _BAD_RECORD
                break
            _leaves(buf, out[r], kinds, nulls, ints[r], floats[r], flags[r])
            stops[r] = stop
            r += 1
            left -= 1
            pos = stop
        if left == 0:  # the block is done: its sync marker
            if block_end + 16 > end:
                state[0] = _BAD_SYNC
                break
            for i in range(16):
                if buf[block_end + i] != sync[i]:
                    state[0] = _BAD_SYNC
            if state[0] != 0:
                break
            pos = block_end + 16
    state[1], state[2], state[3] = pos, left, block_end
    return r


@functools.lru_cache(maxsize=1)
def _jitted():
    """The numba-compiled :func:`_walk`, :func:`_leaves`,
    :func:`_walk_block` and :func:`_walk_blocks`, or None without numba.

    Compiled on first use in a process (numba keeps the machine code in its
    cache beside this module when it may write there).
    """
    try:
        import numba
    except ImportError:
        return None
    # Copies of the two functions whose global names ``_read_long`` and
    # ``_walk`` (its own recursive call) refer to the compiled ones.
    namespace = {"__name__": __name__, "_CORRUPT": _CORRUPT, "np": np}
    namespace.update(_BLOCK_ERRORS)

    def compiled(fn):
        copy = types.FunctionType(fn.__code__, namespace, fn.__name__)
        copy.__qualname__ = fn.__qualname__
        namespace[fn.__name__] = numba.njit(cache=True, nogil=True)(copy)
        return namespace[fn.__name__]

    compiled(_read_long)
    return (
        compiled(_walk),
        compiled(_leaves),
        compiled(_walk_block),
        compiled(_walk_blocks),
    )


# --------------------------------------------------------------------------
# compiling a schema
# --------------------------------------------------------------------------


class _Tables:
    """The flat tables of a schema's types, built depth first."""

    def __init__(self):
        self.kind, self.arg, self.first, self.count = [], [], [], []
        self.kids, self.slots = [], []
        self.named = {}  # full name -> node, for shared (unplanned) types
        self.primitive = {}

    def node(self, kind, arg=0):
        self.kind.append(kind)
        self.arg.append(arg)
        self.first.append(0)
        self.count.append(0)
        return len(self.kind) - 1

    def children(self, node, kids, slots=None):
        self.first[node] = len(self.kids)
        self.count[node] = len(kids)
        self.kids.extend(kids)
        self.slots.extend(slots if slots is not None else [-1] * len(kids))

    def arrays(self):
        """``nodes`` (kind, arg, first, count) and ``fields`` (type, slot)."""
        nodes = np.array([self.kind, self.arg, self.first, self.count], np.int64)
        fields = np.array([self.kids, self.slots], np.int64).reshape(2, -1)
        return np.ascontiguousarray(nodes.T), np.ascontiguousarray(fields.T)


def _full_name(schema, namespace):
    name = schema["name"]
    if "." in name:
        return name, name.rsplit(".", 1)[0]
    namespace = schema.get("namespace", namespace)
    return (f"{namespace}.{name}" if namespace else name), namespace


class _Compiler:
    """Writer schema -> tables, plus the plan of the fields to decode."""

    def __init__(self, top_fields, sub_fields):
        self.top, self.sub = top_fields, sub_fields
        self.t = _Tables()
        self.defs = {}  # full name -> (definition, its namespace)
        self.n_slots = 0
        self.leaves = []  # (type, namespace) of the fields decoded whole
        self.trimmed = set()  # record types of which some fields are decoded
        self.whole = set()  # record types decoded field by field, all fields

    def define(self, schema, namespace):
        """Register the named types of ``schema`` (before any reference)."""
        if isinstance(schema, list):
            for s in schema:
                self.define(s, namespace)
        elif isinstance(schema, dict):
            kind = schema.get("type")
            if kind in ("record", "error", "enum", "fixed"):
                full, namespace = _full_name(schema, namespace)
                self.defs[full] = (schema, namespace)
                for alias in schema.get("aliases", ()):
                    self.defs.setdefault(alias, (schema, namespace))
            if kind in ("record", "error"):
                for f in schema["fields"]:
                    self.define(f["type"], namespace)
            elif kind == "array":
                self.define(schema["items"], namespace)
            elif kind == "map":
                self.define(schema["values"], namespace)
            elif isinstance(kind, dict | list):
                self.define(kind, namespace)

    def resolve(self, schema, namespace):
        """``(definition, namespace)`` of a type, following name references."""
        while isinstance(schema, str) and schema not in _PRIMITIVES:
            full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
            found = self.defs.get(full) or self.defs.get(schema)
            if found is None:
                raise _Unsupported(f"unknown type {schema!r}")
            schema, namespace = found
        if isinstance(schema, dict) and isinstance(schema.get("type"), dict | list):
            return self.resolve(schema["type"], namespace)
        if (
            isinstance(schema, dict)
            and schema.get("type") in _PRIMITIVES
            and "logicalType" not in schema
        ):
            return schema["type"], namespace
        return schema, namespace

    def build(self, schema, namespace):
        """Node of a type that is skipped whole (named types shared)."""
        schema, namespace = self.resolve(schema, namespace)
        t = self.t
        if isinstance(schema, str):
            if schema not in t.primitive:
                t.primitive[schema] = t.node(_PRIMITIVES[schema])
            return t.primitive[schema]
        if isinstance(schema, list):
            node = t.node(_UNION)
            t.children(node, [self.build(s, namespace) for s in schema])
            return node
        kind = schema["type"]
        if kind in _PRIMITIVES:  # with a logical type: same bytes
            return t.node(_PRIMITIVES[kind])
        if kind in ("record", "error", "enum", "fixed"):
            full, namespace = _full_name(schema, namespace)
            if full in t.named:
                return t.named[full]
        if kind in ("record", "error"):
            node = t.named[full] = t.node(_RECORD)
            fields = [self.build(f["type"], namespace) for f in schema["fields"]]
            t.children(node, fields)
        elif kind == "enum":
            node = t.named[full] = t.node(_ENUM, len(schema["symbols"]))
        elif kind == "fixed":
            node = t.named[full] = t.node(_FIXED, int(schema["size"]))
        elif kind == "array":
            node = t.node(_ARRAY)
            t.arg[node] = self.build(schema["items"], namespace)
        elif kind == "map":
            node = t.node(_MAP)
            t.arg[node] = self.build(schema["values"], namespace)
        else:
            raise _Unsupported(f"unknown Avro type {kind!r}")
        return node

    def planned_record(self, schema, namespace, wanted):
        """A fresh record node whose ``wanted`` fields get slots; its plan."""
        t = self.t
        node = t.node(_RECORD)
        kids, slots, plan = [], [], []
        for f in schema["fields"]:
            name = f["name"]
            if name not in wanted:
                kids.append(self.build(f["type"], namespace))
                slots.append(-1)
                continue
            slot = self.n_slots
            self.n_slots += 1
            sub = self.sub.get(name) if wanted is self.top else None
            if sub is None:
                sub = self.all_primitive_fields(f["type"], namespace)
            if sub is None:
                if _has_logical_type(f["type"], self, namespace, set()):
                    raise _Unsupported(f"field {name!r} has a logical type")
                self.leaves.append((f["type"], namespace))
                kids.append(self.build(f["type"], namespace))
                plan.append((name, slot, f["type"], namespace, None))
            else:
                kid, subplan = self.planned_nested(f["type"], namespace, sub)
                kids.append(kid)
                plan.append((name, slot, f["type"], namespace, subplan))
            slots.append(slot)
        t.children(node, kids, slots)
        return node, plan

    def all_primitive_fields(self, schema, namespace):
        """The field names of a record type (or of the union of null and
        one) all of whose fields are primitives (or null and a primitive),
        else None: such a record (e.g. a ZTF cutout) is decoded field by
        field like a trimmed one."""
        schema, namespace = self.resolve(schema, namespace)
        if isinstance(schema, list):
            branches = [self.resolve(b, namespace) for b in schema]
            records = [b for b in branches if b[0] != "null"]
            if len(records) != 1:
                return None
            schema, namespace = records[0]
        if not isinstance(schema, dict) or schema.get("type") not in _RECORDS:
            return None
        _, inner = _full_name(schema, namespace)
        for f in schema["fields"]:
            if _primitive_leaf(self, f["type"], inner) is None:
                return None
        return _Whole(f["name"] for f in schema["fields"])

    def planned_nested(self, schema, namespace, wanted):
        """A wanted field whose record keeps only some fields: the record, or
        a union of null and that record."""
        schema, namespace = self.resolve(schema, namespace)
        if isinstance(schema, dict) and schema.get("type") in ("record", "error"):
            full, inner = _full_name(schema, namespace)
            (self.whole if isinstance(wanted, _Whole) else self.trimmed).add(full)
            node, plan = self.planned_record(schema, inner, wanted)
            return node, ("record", plan)
        if isinstance(schema, list):
            branches = [self.resolve(s, namespace) for s in schema]
            records = [
                i
                for i, (s, _) in enumerate(branches)
                if isinstance(s, dict) and s.get("type") in ("record", "error")
            ]
            if len(records) != 1:
                raise _Unsupported("a union of several records")
            node = self.t.node(_UNION)
            kids, plans = [], {}
            for i, (s, ns) in enumerate(branches):
                if i == records[0]:
                    full, inner = _full_name(s, ns)
                    whole = isinstance(wanted, _Whole)
                    (self.whole if whole else self.trimmed).add(full)
                    kid, plans[i] = self.planned_record(s, inner, wanted)
                else:
                    if _has_logical_type(s, self, ns, set()):
                        raise _Unsupported("a logical type in a wanted union")
                    self.leaves.append((s, ns))
                    kid = self.build(s, ns)
                kids.append(kid)
            self.t.children(node, kids)
            return node, ("union", plans)
        # not a record: fastavro's projection keeps it whole
        if _has_logical_type(schema, self, namespace, set()):
            raise _Unsupported("a logical type in a wanted field")
        self.leaves.append((schema, namespace))
        return self.build(schema, namespace), None

    def check(self):
        """Refuse a record type trimmed in one wanted field and decoded
        whole in another: fastavro's projection trims it in both."""
        used = set(self.whole)
        for schema, namespace in self.leaves:
            used |= _named_types(schema, self, namespace, set())
        if used & self.trimmed:
            raise _Unsupported(f"{sorted(used & self.trimmed)} trimmed and whole")


class _Whole(frozenset):
    """Every field of a record (decoded one by one, not trimmed)."""


def _primitive_leaf(compiler, schema, namespace):
    """``(type name, null branch)`` of a primitive type (null branch -1) or
    of the union of null and a primitive, for :func:`_leaves`; else None."""
    schema, namespace = compiler.resolve(schema, namespace)
    if isinstance(schema, str) and schema != "null":
        return schema, -1
    if isinstance(schema, list) and len(schema) == 2:
        branches = [compiler.resolve(b, namespace)[0] for b in schema]
        if "null" in branches:
            null = branches.index("null")
            other = branches[1 - null]
            if isinstance(other, str) and other != "null":
                return other, null
    return None


def _has_logical_type(schema, compiler, namespace, seen):
    """Whether decoding ``schema`` whole meets a logical type (fastavro would
    convert it; the Python decoder here does not)."""
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return False
        full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
        if full in seen:
            return False
        seen.add(full)
        found = compiler.defs.get(full) or compiler.defs.get(schema)
        if found is None:
            raise _Unsupported(f"unknown type {schema!r}")
        return _has_logical_type(found[0], compiler, found[1], seen)
    if isinstance(schema, list):
        return any(_has_logical_type(s, compiler, namespace, seen) for s in schema)
    if "logicalType" in schema:
        return True
    kind = schema.get("type")
    if isinstance(kind, dict | list):
        return _has_logical_type(kind, compiler, namespace, seen)
    if kind in ("record", "error"):
        _, inner = _full_name(schema, namespace)
        return any(
            _has_logical_type(f["type"], compiler, inner, seen)
            for f in schema["fields"]
        )
    if kind == "array":
        return _has_logical_type(schema["items"], compiler, namespace, seen)
    if kind == "map":
        return _has_logical_type(schema["values"], compiler, namespace, seen)
    return False


def _named_types(schema, compiler, namespace, seen):
    """Full names of the named types that decoding ``schema`` whole meets."""
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return seen
        full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
        found = compiler.defs.get(full) or compiler.defs.get(schema)
        if found is None:
            raise _Unsupported(f"unknown type {schema!r}")
        return _named_types(found[0], compiler, found[1], seen)
    if isinstance(schema, list):
        for s in schema:
            _named_types(s, compiler, namespace, seen)
        return seen
    kind = schema.get("type")
    if isinstance(kind, dict | list):
        return _named_types(kind, compiler, namespace, seen)
    if kind in ("record", "error", "enum", "fixed"):
        full, inner = _full_name(schema, namespace)
        if full in seen:
            return seen
        seen.add(full)
        if kind in ("record", "error"):
            for f in schema["fields"]:
                _named_types(f["type"], compiler, inner, seen)
    elif kind == "array":
        _named_types(schema["items"], compiler, namespace, seen)
    elif kind == "map":
        _named_types(schema["values"], compiler, namespace, seen)
    return seen


def _clean(schema):
    """A schema without fastavro's ``__`` bookkeeping keys, as plain JSON."""
    if isinstance(schema, dict):
        return {k: _clean(v) for k, v in schema.items() if not k.startswith("__")}
    if isinstance(schema, list):
        return [_clean(s) for s in schema]
    return schema


class RecordDecoder:
    """Decode the wanted fields of records written with one schema.

    Parameters
    ----------
    schema : dict
        The writer schema (a record), as JSON or parsed by fastavro.
    top_fields : frozenset of str
        Fields of the record to decode.
    sub_fields : dict of str to frozenset
        For some of those fields, whose type is a record (or a union of null
        and a record), the only fields of it to decode.
    walk : tuple of callables
        The compiled :func:`_walk`, :func:`_leaves`, :func:`_walk_block` and
        :func:`_walk_blocks` (from :func:`_jitted`).
    views : bool, default=False
        Give values of type bytes as read-only memoryviews of the decoded
        buffer, when it is a bytes object, instead of copies (the readers:
        most cutouts they meet are not decoded, or decoded once).

    Use :func:`record_decoder`, which returns None when numba is missing or
    the schema needs something the walker does not do.
    """

    def __init__(self, schema, top_fields, sub_fields, walk, views=False):
        schema = _clean(schema)
        if not isinstance(schema, dict) or schema.get("type") not in _RECORDS:
            raise _Unsupported("not a record schema")
        c = _Compiler(top_fields, sub_fields)
        c.define(schema, None)
        _, namespace = _full_name(schema, None)
        self.root, self.plan = c.planned_record(schema, namespace, top_fields)
        c.check()
        self.tables = c.t.arrays()
        self.n_slots = max(c.n_slots, 1)
        self._kinds = np.zeros(self.n_slots, dtype=np.int64)
        self._nulls = np.full(self.n_slots, -1, dtype=np.int64)
        self._views = views
        self._plan = self._readers(c, self.plan)
        self._build = self._builder(self._plan)
        self._walk, self._leaves, self._walk_block, self._walk_blocks = walk

    def _readers(self, compiler, plan):
        """The plan with how each field is decoded: primitives by
        :func:`_leaves` (noted in ``_kinds`` and ``_nulls``), other whole
        values by a value reader, records of wanted fields field by field."""
        out = []
        for name, slot, schema, namespace, subplan in plan:
            if subplan is None:  # decoded whole
                leaf = _primitive_leaf(compiler, schema, namespace)
                if leaf is not None:
                    type_name, null = leaf
                    self._kinds[slot] = _PRIMITIVES[type_name]
                    self._nulls[slot] = null
                    out.append((name, slot, _PRIMITIVE, type_name))
                else:
                    read = _value_reader(compiler, schema, namespace)
                    out.append((name, slot, _LEAF, read))
            elif subplan[0] == "record":  # a record of wanted fields
                out.append((name, slot, _SUB, self._readers(compiler, subplan[1])))
            else:  # a union: records of wanted fields, other branches whole
                resolved, ns = compiler.resolve(schema, namespace)
                branches = [
                    (_SUB, self._readers(compiler, subplan[1][i]))
                    if i in subplan[1]
                    else (_LEAF, _value_reader(compiler, s, ns))
                    for i, s in enumerate(resolved)
                ]
                out.append((name, slot, _UNION_SUB, branches))
        return out

    def read(self, buf, pos=0):
        """Decode one record of ``buf`` (bytes) at ``pos``: ``(record, next
        position)``. Raises ValueError for data that do not fit the schema."""
        records = _Records(self, buf, 1, pos)
        record = next(records)
        return record, records.stop

    def records(self, buf, count, pos=0):
        """Decode ``count`` records in a row from ``pos`` (a block of a
        container file): an iterator of the records, whose ``stop`` is the
        position after the last one. The walk is one compiled call; the
        records that fit the schema are yielded, then ValueError is raised
        for the first that does not."""
        return _Records(self, buf, count, pos)

    def _decode(self, buf, count, pos):
        """The walk of :meth:`records`: ``(records that fit, their dicts,
        position after the last of them)``."""
        data = np.frombuffer(buf, dtype=np.uint8)
        tables, stops = self._tables(count)
        n_ok = int(
            self._walk_block(
                data, pos, len(data), count, self.root, *self.tables, tables, stops
            )
        )
        stop = int(stops[n_ok - 1]) if n_ok else pos
        return n_ok, self._build(buf, _rows_of(tables, slice(n_ok))), stop

    def _tables(self, count):
        """Empty ``(out, kinds, nulls, ints, floats, flags)`` and ``stops``
        for ``count`` records."""
        n = self.n_slots
        out = np.full((count, n, 2), -1, dtype=np.int64)
        ints, floats = np.zeros((count, n), np.int64), np.zeros((count, n))
        flags = np.zeros((count, n), dtype=np.int64)
        tables = (out, self._kinds, self._nulls, ints, floats, flags)
        return tables, np.zeros(count, dtype=np.int64)

    def container_records(self, f, sync):
        """The records of an Avro container file whose codec is null, read
        from ``f`` (positioned after the file's header) to its end.

        The file is read :data:`_CHUNK` bytes at a time (more for a larger
        block), and its blocks are walked many records per compiled call.
        Raises, after the records before it, ValueError for a record or
        block that does not fit, EOFError for a file cut off.
        """
        sync = np.frombuffer(sync, dtype=np.uint8)
        state = np.zeros(6, dtype=np.int64)
        buf = f.read(_CHUNK)
        at_end = len(buf) < _CHUNK
        limit = 8  # then more per call: one-alert files stay cheap
        while True:
            tables, stops = self._tables(limit)
            data = np.frombuffer(buf, dtype=np.uint8)
            n = self._walk_blocks(
                data,
                len(data),
                at_end,
                sync,
                limit,
                self.root,
                *self.tables,
                tables,
                stops,
                state,
            )
            del data
            for first in range(0, n, _BUILD_AT_ONCE):
                rows = slice(first, min(first + _BUILD_AT_ONCE, n))
                yield from self._build(buf, _rows_of(tables, rows))
            error, used_up = state[0], n < limit and not state[0]
            limit = min(2 * limit, 256)
            if not at_end and (used_up or error in (_CUT_HEADER, _CUT_BLOCK)):
                # The walk stopped at the end of buf, between two blocks. A
                # block cut off is completed by reading exactly what it
                # lacks (first 20 bytes for a header cut off, the most two
                # varints take), and walked alone: then the next chunk is
                # read into a new buffer, no large copy made.
                tail = buf[state[1] :]
                if error == _CUT_BLOCK:
                    want = int(state[4] + 16 - state[5])
                elif error == _CUT_HEADER:
                    want = 20
                else:
                    want = _CHUNK
                more = f.read(want)
                at_end = len(more) < want
                buf = tail + more if tail else more
                state[:] = 0
            elif error:
                raise _block_error(state)
            elif used_up:
                return

    def _builder(self, plan):
        """``build(buf, tables)``: the dicts of the wanted fields of the
        records of ``tables`` (the walk's rows, one per record), built field
        by field for all the records at once: a column per field, chosen
        once here, then a dict per record."""
        names = [name for name, *_ in plan]
        columns = [self._column(slot, kind, read) for _, slot, kind, read in plan]

        def build(buf, tables):
            if not columns:
                return [{} for _ in range(len(tables[0]))]
            values = [column(buf, tables) for column in columns]
            return [dict(zip(names, row, strict=True)) for row in zip(*values)]

        return build

    def _column(self, slot, kind, read):
        """``column(buf, tables)``: the values of one field, a list with one
        per row of ``tables``."""
        if kind == _PRIMITIVE:  # decoded by _leaves
            return _primitive_column(read, slot, self._views)
        if kind == _SUB:  # a record of wanted fields
            return self._builder(read)
        if kind == _LEAF:  # decoded whole by a value reader
            return lambda buf, tables: [
                read(buf, p)[0] for p in tables[0][:, slot, 0].tolist()
            ]
        branches = [  # a union: the branch index, then the branch
            (k, self._builder(r) if k == _SUB else r) for k, r in read
        ]

        def union_column(buf, tables):
            taken = [_py_long(buf, p) for p in tables[0][:, slot, 0].tolist()]
            indices = [b for b, _ in taken]
            values = [None] * len(taken)
            for b in set(indices):
                k, r = branches[b]
                rows = [i for i, index in enumerate(indices) if index == b]
                if k != _SUB:
                    for i in rows:
                        values[i] = r(buf, taken[i][1])[0]
                    continue
                # the fields of a branch not taken are not met: the record is
                # built from the rows that took it only
                some = tables if len(rows) == len(taken) else _rows_of(tables, rows)
                for i, value in zip(rows, r(buf, some), strict=True):
                    values[i] = value
            return values

        return union_column


def _rows_of(tables, rows):
    """The walk's ``tables`` for the records ``rows`` (a slice or indices)."""
    out, kinds, nulls, ints, floats, flags = tables
    return out[rows], kinds, nulls, ints[rows], floats[rows], flags[rows]


def _block_error(state):
    """The exception for the error code of :func:`_walk_blocks`."""
    error = int(state[0])
    if error == _CUT_HEADER:
        return EOFError("file ends inside a block header")
    if error == _CUT_BLOCK:
        return EOFError(f"block of {state[4]} bytes, {state[5]} present")
    if error == _BAD_SYNC:
        return ValueError("expected sync marker not found")
    if error == _BAD_RECORD:
        return ValueError(_DOES_NOT_FIT)
    return ValueError("corrupt block header")  # _BAD_HEADER


class _Records:
    """The iterator of :meth:`RecordDecoder.records`."""

    def __init__(self, decoder, buf, count, pos):
        #: ``stop``: the position after the last record that fits the schema.
        self.n_ok, self.values, self.stop = decoder._decode(buf, count, pos)
        self.count, self.index = count, 0

    def __iter__(self):
        return self

    def __next__(self):
        r = self.index
        if r == self.count:
            raise StopIteration
        if r == self.n_ok:
            raise ValueError(_DOES_NOT_FIT)
        self.index += 1
        return self.values[r]


def _utf8(value):
    return str(value, "utf-8")


def _same(value):
    return value


def _primitive_column(type_name, s, views=False):
    """The column of slot ``s``, a primitive decoded by :func:`_leaves`:
    None where flagged (null, or not met). With ``views``, bytes are
    memoryviews of a buffer of type bytes (see :class:`RecordDecoder`)."""
    if type_name in ("string", "bytes"):

        def text_column(buf, tables):
            out, _, _, ints, _, flags = tables
            if type_name == "string":
                convert = _utf8
            elif views and type(buf) is bytes:
                convert, buf = _same, memoryview(buf)
            else:
                convert = bytes
            return [
                None if g else convert(buf[a:b])
                for a, b, g in zip(
                    ints[:, s].tolist(),
                    out[:, s, 1].tolist(),
                    flags[:, s].tolist(),
                    strict=True,
                )
            ]

        return text_column

    def column(buf, tables):
        _, _, _, ints, floats, flags = tables
        if type_name in _FLOATS:
            values = floats[:, s].tolist()
        elif type_name == "boolean":
            values = (ints[:, s] != 0).tolist()
        else:  # int, long
            values = ints[:, s].tolist()
        null = flags[:, s]
        if not null.any():
            return values
        return [None if g else v for v, g in zip(values, null.tolist(), strict=True)]

    return column


_unpack_float = struct.Struct("<f").unpack_from
_unpack_double = struct.Struct("<d").unpack_from


def _py_long(buf, pos):
    """(value, next position) of a zig-zag varint of ``buf`` (bytes)."""
    b = buf[pos]
    if b < 0x80:  # one byte: most union indices, counts and small ints
        return (b >> 1) ^ -(b & 1), pos + 1
    result, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = buf[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return (result >> 1) ^ -(result & 1), pos + 1
        shift += 7


def _read_null(buf, pos):
    return None, pos


def _read_boolean(buf, pos):
    return buf[pos] != 0, pos + 1


def _read_float(buf, pos):
    return _unpack_float(buf, pos)[0], pos + 4


def _read_double(buf, pos):
    return _unpack_double(buf, pos)[0], pos + 8


def _read_bytes(buf, pos):
    n, pos = _py_long(buf, pos)
    return buf[pos : pos + n], pos + n


def _read_string(buf, pos):
    n, pos = _py_long(buf, pos)
    return str(buf[pos : pos + n], "utf-8"), pos + n


_PRIMITIVE_READERS = {
    "null": _read_null,
    "boolean": _read_boolean,
    "int": _py_long,
    "long": _py_long,
    "float": _read_float,
    "double": _read_double,
    "bytes": _read_bytes,
    "string": _read_string,
}


def _value_reader(compiler, schema, namespace, building=None):
    """A function ``(buf, pos) -> (value, next position)`` decoding a whole
    value of ``schema`` as fastavro does (no logical types)."""
    building = {} if building is None else building
    schema, namespace = compiler.resolve(schema, namespace)
    if isinstance(schema, str):
        return _PRIMITIVE_READERS[schema]
    if isinstance(schema, list):
        branches = [_value_reader(compiler, s, namespace, building) for s in schema]

        def read_union(buf, pos):
            index, pos = _py_long(buf, pos)
            return branches[index](buf, pos)

        return read_union
    kind = schema["type"]
    if kind in _PRIMITIVE_READERS:
        return _PRIMITIVE_READERS[kind]
    if kind in ("record", "error", "enum", "fixed"):
        full, inner = _full_name(schema, namespace)
        if full in building:  # a recursive type: look it up when called
            return lambda buf, pos: building[full](buf, pos)
    if kind == "fixed":
        size = int(schema["size"])
        return lambda buf, pos: (buf[pos : pos + size], pos + size)
    if kind == "enum":
        symbols = list(schema["symbols"])

        def read_enum(buf, pos):
            index, pos = _py_long(buf, pos)
            return symbols[index], pos

        return read_enum
    if kind in ("record", "error"):
        fields = []

        def read_record(buf, pos):
            record = {}
            for name, read in fields:
                record[name], pos = read(buf, pos)
            return record, pos

        building[full] = read_record
        fields.extend(
            (f["name"], _value_reader(compiler, f["type"], inner, building))
            for f in schema["fields"]
        )
        return read_record
    if kind in ("array", "map"):
        is_map = kind == "map"
        item = _value_reader(
            compiler, schema["values" if is_map else "items"], namespace, building
        )

        def read_blocks(buf, pos):
            items = {} if is_map else []
            while True:
                n, pos = _py_long(buf, pos)
                if n == 0:
                    return items, pos
                if n < 0:
                    n = -n
                    _, pos = _py_long(buf, pos)
                for _ in range(n):
                    if is_map:
                        key, pos = _read_string(buf, pos)
                        items[key], pos = item(buf, pos)
                    else:
                        value, pos = item(buf, pos)
                        items.append(value)

        return read_blocks
    raise _Unsupported(f"unknown Avro type {kind!r}")


def record_decoder(schema, top_fields, sub_fields, views=False):
    """A :class:`RecordDecoder` for ``schema``, or None (decode with fastavro).

    None when numba is not installed or the schema needs what the walker
    does not do. ``views``: see :class:`RecordDecoder`.
    """
    walk = _jitted()  # (walker, leaf decoder)
    if walk is None:
        return None
    try:
        return RecordDecoder(schema, top_fields, sub_fields, walk, views)
    except (_Unsupported, KeyError, TypeError, ValueError):
        return None
