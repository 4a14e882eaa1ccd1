"""The fleet's sections: `upstream:` (a gateway's hub) and `hub:` (the gateways that relay to it), and the relay
endpoint a gateway's `upstream:` becomes. Each problem is reported by key path; secrets are never shown."""

from pathlib import Path
from typing import Any

from .convert import Converter, kind
from .schema import UPSTREAM_ENDPOINT, EndpointConfig, HubConfig, HubGateway, UpstreamConfig, check_secret
from .units import url_is_link_local

RELAY_PATH = "/v1/relay"
GATEWAY_HEADER = "Webhookd-Gateway"


def _shared_secret(c: Converter, raw: dict[Any, Any], values: dict[str, Any], path: str, whose: str) -> None:
    """`secret` or `secret_file` (its one line) into values["secret"]: exactly one of the two."""
    has_secret, has_file = raw.get("secret") is not None, raw.get("secret_file") is not None
    if has_secret and has_file:
        c.add(f"{path}.secret_file", "use either secret or secret_file, not both")
    elif not has_secret and not has_file:
        c.add(f"{path}.secret", f"missing required key (the secret shared with {whose}; or secret_file: PATH)")
    elif has_file and values.get("secret_file") is not None:
        secret = _one_secret(c, f"{path}.secret_file", values["secret_file"])
        if secret is not None:
            values["secret"] = secret


def upstream(c: Converter, value: object, path: str) -> UpstreamConfig | None:
    """The `upstream:` section (None for ``upstream: null``): `secret` or `secret_file` (its one secret)."""
    if value is None:
        return None
    n_before = len(c.problems)
    values = c.fields(value, UpstreamConfig, path)
    if values is None or not isinstance(value, dict):
        return None
    _shared_secret(c, value, values, path, "the hub")
    if "url" in values and url_is_link_local(values["url"]):
        c.add(f"{path}.url", "link-local address (cloud metadata lives there): refused for a hub")
    if len(c.problems) != n_before:
        return None
    try:
        return UpstreamConfig(**values)
    except TypeError:  # a required key missing (reported)
        return None


def hub(c: Converter, value: object, path: str) -> HubConfig | None:
    """The `hub:` section (None for ``hub: null``): at least one gateway, names unique, each with `secret` or
    `secret_file`."""
    if value is None:
        return None

    def gateways(v: object, gpath: str, _before: dict[str, Any]) -> tuple[HubGateway, ...]:
        if not isinstance(v, list):
            c.add(gpath, f"expected a list of gateways, got {kind(v)}")
            return ()
        if not v:
            c.add(gpath, "must name at least one gateway")
        out: list[HubGateway] = []
        seen: set[str] = set()
        for i, item in enumerate(v):
            gw = _hub_gateway(c, item, f"{gpath}[{i}]")
            if gw is None:
                continue
            if gw.name in seen:
                c.add(f"{gpath}[{i}].name", f"duplicate gateway name {gw.name!r}")
            seen.add(gw.name)
            out.append(gw)
        return tuple(out)

    n_before = len(c.problems)
    values = c.fields(value, HubConfig, path, custom={"gateways": gateways})
    if values is None:
        return None
    if "gateways" not in values:
        c.add(f"{path}.gateways", "missing required key (the gateways that relay to this hub)")
    if len(c.problems) != n_before:
        return None
    return HubConfig(**values)


def _hub_gateway(c: Converter, value: object, path: str) -> HubGateway | None:
    n_before = len(c.problems)
    values = c.fields(value, HubGateway, path)
    if values is None or not isinstance(value, dict):
        return None
    _shared_secret(c, value, values, path, "the gateway")
    if len(c.problems) != n_before:
        return None
    try:
        return HubGateway(**values)
    except TypeError:  # a required key missing (reported)
        return None


def _one_secret(c: Converter, fpath: str, p: Path) -> str | None:
    content = c.read_text(fpath, p)
    if content is None:
        return None
    lines = [(n, line.strip()) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
    if len(lines) != 1:
        c.add(fpath, f"{'no secret' if not lines else 'more than one line'} in {p} (expected the one shared secret)")
        return None
    spath = f"{fpath} (line {lines[0][0]} of the file)"
    try:
        return check_secret(lines[0][1], c.at(spath))
    except ValueError as e:
        c.add(spath, str(e))
        return None


def relay_endpoint(up: UpstreamConfig) -> EndpointConfig:
    """The endpoint `upstream` of a gateway: every event, every device, one per request in the webhookd format,
    signed hmac-sha256 with the shared secret, retried forever (`relay`)."""
    assert up.secret is not None  # load.py made sure
    return EndpointConfig(
        name=UPSTREAM_ENDPOINT,
        url=up.url + RELAY_PATH,
        description=f"relay to the hub as gateway {up.gateway}",
        secrets=(up.secret,),
        signature="hmac-sha256",
        headers={GATEWAY_HEADER: up.gateway},
        timeout=up.timeout,
        concurrency=up.concurrency,
        tls_verify=up.tls_verify,
        ca_file=up.ca_file,
        relay=True,
    )
