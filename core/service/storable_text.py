"""Text a request may carry but no database column can store.

PostgreSQL refuses a NUL character in any text value (SQLite stores it), and a request
that reached the database with one failed there with an internal error. Every string field
of a request (ids, names, cron, map keys and values) is checked before its handler runs.
JSON values (google.protobuf.Struct/Value) are stored as JSON text, where a NUL is written
as the escape \\u0000, so they are left alone.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ipaas.errors import InvalidArgument

JSON_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


def nul_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first string field holding a NUL character, or None."""
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            for i, text in enumerate(value if field.is_repeated else (value,)):
                if "\x00" in text:
                    return f"{path}[{i}]" if field.is_repeated else path
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name not in JSON_TYPES:
            if field.message_type.GetOptions().map_entry:
                entry_value = field.message_type.fields_by_name["value"]
                for key, item in value.items():
                    if isinstance(key, str) and "\x00" in key:
                        return f"{path}[{key!r}]"
                    if entry_value.type == FieldDescriptor.TYPE_STRING and "\x00" in item:
                        return f"{path}[{key!r}]"
                    if entry_value.type == FieldDescriptor.TYPE_MESSAGE and (found := nul_field(item, f"{path}[{key!r}].")):
                        return found
            elif field.is_repeated:
                for i, item in enumerate(value):
                    if found := nul_field(item, f"{path}[{i}]."):
                        return found
            elif found := nul_field(value, path + "."):
                return found
    return None


def check(message: Message) -> None:
    if (path := nul_field(message)) is not None:
        raise InvalidArgument.field(path, "must not contain NUL characters")
