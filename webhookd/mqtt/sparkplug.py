"""Sparkplug B payloads (Eclipse Tahu ``sparkplug_b.proto``), decoded with the `protobuf` package.

The message types are built here from the published .proto's field numbers (`descriptor_pb2`, in a pool of
our own): no protoc step and no generated file to keep in sync. Only `bd_seq` is read by webhookd (the rule
of an NDEATH counting only for the node's last NBIRTH), but the whole Payload is declared so that any valid
payload decodes (a field of the wrong wire type would otherwise make protobuf refuse it).
"""

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

PACKAGE: Final = "org.eclipse.tahu.protobuf"

_T = descriptor_pb2.FieldDescriptorProto
_TYPES: Final = {
    "uint32": _T.TYPE_UINT32,
    "uint64": _T.TYPE_UINT64,
    "float": _T.TYPE_FLOAT,
    "double": _T.TYPE_DOUBLE,
    "bool": _T.TYPE_BOOL,
    "string": _T.TYPE_STRING,
    "bytes": _T.TYPE_BYTES,
}
# The scalar members every `oneof value` starts with (name, type), numbered from where each one starts.
_VALUES: Final[tuple[tuple[str, str], ...]] = (
    ("int_value", "uint32"),
    ("long_value", "uint64"),
    ("float_value", "float"),
    ("double_value", "double"),
    ("boolean_value", "bool"),
    ("string_value", "string"),
)

Field = tuple[str, int, str, bool]  # name, number, type (a scalar name or a message's full name), repeated


def _message(
    name: str, fields: list[Field], *, oneof: list[Field] | None = None, extensions_from: int | None = None
) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype, repeated in fields + (oneof or []):
        f = msg.field.add(name=fname, number=number)
        f.label = _T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL
        if ftype in _TYPES:
            f.type = _TYPES[ftype]
        else:
            f.type, f.type_name = _T.TYPE_MESSAGE, f".{PACKAGE}.{ftype}"
        if oneof is not None and (fname, number, ftype, repeated) in oneof:
            f.oneof_index = 0
    if oneof:
        msg.oneof_decl.add(name="value")
    if extensions_from is not None:
        msg.extension_range.add(start=extensions_from, end=536870912)  # `extensions N to max`
    return msg


def _values(first: int, *extra: tuple[str, str]) -> list[Field]:
    """The `oneof value` members numbered from `first`: the six scalars, then `extra` (name, type)."""
    members = [*_VALUES, *extra]
    return [(n, first + i, t, False) for i, (n, t) in enumerate(members)]


def _extension(name: str) -> descriptor_pb2.DescriptorProto:
    return _message(name, [], extensions_from=1)


def _file() -> descriptor_pb2.FileDescriptorProto:
    p = "Payload"
    template = _message(
        "Template",
        [
            ("version", 1, "string", False),
            ("metrics", 2, f"{p}.Metric", True),
            ("parameters", 3, f"{p}.Template.Parameter", True),
            ("template_ref", 4, "string", False),
            ("is_definition", 5, "bool", False),
        ],
        extensions_from=6,
    )
    parameter = _message(
        "Parameter",
        [("name", 1, "string", False), ("type", 2, "uint32", False)],
        oneof=_values(3, ("extension_value", f"{p}.Template.Parameter.ParameterValueExtension")),
    )
    parameter.nested_type.append(_extension("ParameterValueExtension"))
    template.nested_type.append(parameter)
    dataset = _message(
        "DataSet",
        [
            ("num_of_columns", 1, "uint64", False),
            ("columns", 2, "string", True),
            ("types", 3, "uint32", True),
            ("rows", 4, f"{p}.DataSet.Row", True),
        ],
        extensions_from=5,
    )
    ds_ext = f"{p}.DataSet.DataSetValue.DataSetValueExtension"
    ds_value = _message("DataSetValue", [], oneof=_values(1, ("extension_value", ds_ext)))
    ds_value.nested_type.append(_extension("DataSetValueExtension"))
    row = _message("Row", [("elements", 1, f"{p}.DataSet.DataSetValue", True)], extensions_from=2)
    dataset.nested_type.extend([ds_value, row])
    prop_value = _message(
        "PropertyValue",
        [("type", 1, "uint32", False), ("is_null", 2, "bool", False)],
        oneof=_values(
            3,
            ("propertyset_value", f"{p}.PropertySet"),
            ("propertysets_value", f"{p}.PropertySetList"),
            ("extension_value", f"{p}.PropertyValue.PropertyValueExtension"),
        ),
    )
    prop_value.nested_type.append(_extension("PropertyValueExtension"))
    prop_set = _message(
        "PropertySet", [("keys", 1, "string", True), ("values", 2, f"{p}.PropertyValue", True)], extensions_from=3
    )
    prop_list = _message("PropertySetList", [("propertyset", 1, f"{p}.PropertySet", True)], extensions_from=2)
    metadata = _message(
        "MetaData",
        [
            ("is_multi_part", 1, "bool", False),
            ("content_type", 2, "string", False),
            ("size", 3, "uint64", False),
            ("seq", 4, "uint64", False),
            ("file_name", 5, "string", False),
            ("file_type", 6, "string", False),
            ("md5", 7, "string", False),
            ("description", 8, "string", False),
        ],
        extensions_from=9,
    )
    metric_scalars = _values(10)
    metric = _message(
        "Metric",
        [
            ("name", 1, "string", False),
            ("alias", 2, "uint64", False),
            ("timestamp", 3, "uint64", False),
            ("datatype", 4, "uint32", False),
            ("is_historical", 5, "bool", False),
            ("is_transient", 6, "bool", False),
            ("is_null", 7, "bool", False),
            ("metadata", 8, f"{p}.MetaData", False),
            ("properties", 9, f"{p}.PropertySet", False),
        ],
        oneof=[
            *metric_scalars,
            ("bytes_value", 16, "bytes", False),
            ("dataset_value", 17, f"{p}.DataSet", False),
            ("template_value", 18, f"{p}.Template", False),
            ("extension_value", 19, f"{p}.Metric.MetricValueExtension", False),
        ],
    )
    metric.nested_type.append(_extension("MetricValueExtension"))
    payload = _message(
        p,
        [
            ("timestamp", 1, "uint64", False),
            ("metrics", 2, f"{p}.Metric", True),
            ("seq", 3, "uint64", False),
            ("uuid", 4, "string", False),
            ("body", 5, "bytes", False),
        ],
        extensions_from=6,
    )
    payload.nested_type.extend([template, dataset, prop_value, prop_set, prop_list, metadata, metric])
    return descriptor_pb2.FileDescriptorProto(
        name="webhookd/sparkplug_b.proto", package=PACKAGE, syntax="proto2", message_type=[payload]
    )


_POOL: Final = descriptor_pool.DescriptorPool()  # our own: no clash with a generated sparkplug_b_pb2
#: The Sparkplug B ``Payload`` message class (``Payload()``, ``.metrics.add(...)``, ``SerializeToString()``).
Payload: Final[Any] = message_factory.GetMessageClass(_POOL.Add(_file()).message_types_by_name["Payload"])


class Undecodable(ValueError):
    """Not a Sparkplug B payload."""


def decode(data: bytes) -> Any:
    """The Payload message of `data`. Raises Undecodable."""
    msg = Payload()
    try:
        msg.ParseFromString(data)
    except message.DecodeError:
        raise Undecodable("undecodable Sparkplug B payload") from None
    return msg


def bd_seq(data: bytes) -> int | None:
    """The ``bdSeq`` metric of an NBIRTH or NDEATH payload (None when it has none). Raises Undecodable."""
    for metric in decode(data).metrics:
        if metric.name == "bdSeq":
            kind = metric.WhichOneof("value")
            if kind in ("int_value", "long_value"):  # Int64 by the spec; some nodes send it as an Int32
                return int(getattr(metric, kind))
            return None
    return None
