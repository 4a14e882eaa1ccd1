"""The ``webhookd`` command line (CONTRACT §2): the argument parser and ``main``.

``run`` runs the daemon; ``check-config``, ``gen-secret`` and ``sink`` work locally; every other command is
a thin client of the daemon's admin API (HTTP over the unix socket ``admin.socket``, CONTRACT §8).
``client.py`` reaches the daemon, ``render.py`` prints tables and times, ``commands.py`` and
``deliveries.py`` hold the commands.

Exit codes: 0 ok; 1 failure (bad config, API error, failed test delivery); 2 usage error or unexpected error;
3 the daemon is not running; 130 interrupted. Never a traceback (``WEBHOOKD_DEBUG=1`` shows one for
unexpected errors). Starting must stay fast: modules only some commands need are imported when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence

from webhookd.cli.client import (
    DEFAULT_LIMIT,
    EXIT_ERROR,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    AdminClient,
    AdminError,
    BadAnswer,
    CLIError,
    DaemonNotRunning,
    config_path,
)
from webhookd.cli.commands import (
    cmd_check_config,
    cmd_devices,
    cmd_endpoints,
    cmd_gateways,
    cmd_gen_secret,
    cmd_run,
    cmd_sink,
    cmd_status,
)
from webhookd.cli.deliveries import cmd_deliveries
from webhookd.cli.render import cut, format_duration, format_time, render_table
from webhookd.states import DELIVERY_STATUSES, DEVICE_STATES

__all__ = [
    "AdminClient",
    "AdminError",
    "BadAnswer",
    "CLIError",
    "DaemonNotRunning",
    "build_parser",
    "cmd_check_config",
    "cmd_deliveries",
    "cmd_devices",
    "cmd_endpoints",
    "cmd_gateways",
    "cmd_gen_secret",
    "cmd_run",
    "cmd_sink",
    "cmd_status",
    "config_path",
    "cut",
    "format_duration",
    "format_time",
    "main",
    "render_table",
]

Handler = Callable[[argparse.Namespace], int]


# -------------------------------------------------------------------------------------------------- parser


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return n


def _delivery_id(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a delivery id: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"not a delivery id: {value}")
    return n


def _port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return n


def _common(json_flag: bool) -> argparse.ArgumentParser:
    """-c/--config (and --json) for a subcommand. SUPPRESS defaults, so that a value given before the
    subcommand is not reset by the subparser's default."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $WEBHOOKD_CONFIG, else /etc/webhookd/config.yaml)",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON document")
    return p


def build_parser() -> argparse.ArgumentParser:
    from webhookd import __version__

    plain, data = _common(False), _common(True)
    parser = argparse.ArgumentParser(
        prog="webhookd",
        description="Device presence daemon: heartbeats in, signed durable webhooks out.",
        epilog="-c and --json may come before or after the command. gen-secret and sink read no config "
        "and refuse -c wherever it is; --json is for the commands that ask the daemon.",
        parents=[data],
    )
    parser.add_argument("--version", action="version", version=f"webhookd {__version__}", help="print the version")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="one of these (COMMAND --help for more)")

    def add(
        name: str,
        handler: Handler,
        help_: str,
        parent: argparse.ArgumentParser | None,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_, description=description or help_, parents=[parent] if parent is not None else []
        )
        # what main() lets through from before the command: -c only where a config is read, --json only
        # where there is an API document to print
        p.set_defaults(handler=handler, takes_config=parent is not None, takes_json=parent is data)
        return p

    add("run", cmd_run, "run the daemon in the foreground", plain)
    add("check-config", cmd_check_config, "validate the config file", plain)
    add("status", cmd_status, "daemon summary", data)

    p = add("devices", cmd_devices, "list devices, or mute / unmute / forget some", data)
    p.add_argument("--state", choices=DEVICE_STATES, default=argparse.SUPPRESS, help="only devices in this state")
    dv_sub = p.add_subparsers(dest="action", metavar="ACTION", help="without one: list the devices")
    mp = dv_sub.add_parser(
        "mute",
        help="maintenance: record these devices' events but deliver none",
        description="Mute devices for maintenance: their state is still tracked and their events recorded, but "
        "no webhooks are sent for them while muted (deliveries made before continue; nothing is sent afterwards "
        "for what happened meanwhile). A glob also mutes devices that first appear while it lasts. Muting the "
        "same ID|GLOB again replaces its mute.",
        parents=[data],
    )
    mp.add_argument("match", metavar="ID|GLOB", help="a device id, or a glob on device ids (quote it: 'printer-*')")
    mp.add_argument(
        "--for",
        dest="for_",
        metavar="DURATION",
        default=argparse.SUPPRESS,
        help="end the mute by itself after this long (30m, 2h, 1d; default: until unmute)",
    )
    mp.add_argument("--reason", metavar="TEXT", default=argparse.SUPPRESS, help="why (shown in the log and the answer)")
    up = dv_sub.add_parser(
        "unmute",
        help="end a mute (deliveries resume for new events)",
        description="End the mute made with exactly this ID|GLOB. A device muted by a glob is unmuted by "
        "unmuting that glob (the error names it).",
        parents=[data],
    )
    up.add_argument("match", metavar="ID|GLOB", help="the ID or GLOB the mute was made with")
    fp = dv_sub.add_parser(
        "forget",
        help="drop a decommissioned device: its state, timer and mute",
        description="Drop a decommissioned device: its state, silence timer and mute go, and no event is made; "
        "the deliveries of its past events continue. A later heartbeat brings it back as a new device.",
        parents=[data],
    )
    fp.add_argument("id", metavar="ID", help="device id (see `webhookd devices`)")

    p = add("endpoints", cmd_endpoints, "list endpoints, or enable / disable / test one", data)
    ep_sub = p.add_subparsers(dest="action", metavar="ACTION", help="without one: list the endpoints")
    for action, text in (
        ("enable", "enable an endpoint (resumes its held deliveries)"),
        ("disable", "disable an endpoint (holds its deliveries)"),
        ("test", "send a webhook.test event now; exit 0 on 2xx"),
    ):
        ap = ep_sub.add_parser(action, help=text, description=text, parents=[data])
        ap.add_argument("name", metavar="NAME", help="endpoint name (see `webhookd endpoints`)")

    add(
        "gateways",
        cmd_gateways,
        "on a hub: list its gateways (state, last seen, devices, events relayed, last error)",
        data,
        "On a hub: every gateway of hub.gateways with its state (unknown until first heard from, online, "
        "offline), when it was last seen, the device count its last heartbeat gave, the events relayed and the "
        "reason its last refused request was refused; --json: an array of {name, state, last_seen, address, "
        "devices, relayed, last_error}. Anywhere else it says that this is not a hub (exit 1).",
    )

    p = add("deliveries", cmd_deliveries, "list deliveries, or replay some", data)
    p.add_argument("--status", choices=DELIVERY_STATUSES, default=argparse.SUPPRESS, help="only this status")
    p.add_argument("--endpoint", metavar="NAME", default=argparse.SUPPRESS, help="only this endpoint's deliveries")
    p.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        default=argparse.SUPPRESS,
        help=f"show at most N, newest first (default {DEFAULT_LIMIT}, the daemon's)",
    )
    dl_sub = p.add_subparsers(dest="action", metavar="ACTION", help="without one: list the deliveries")
    rp = dl_sub.add_parser(
        "replay",
        help="queue deliveries again with a fresh attempt budget",
        description="Queue deliveries again (a fresh attempt budget): by ID, or every delivery of an "
        "endpoint in a status (`replay --endpoint NAME --status dead`).",
        parents=[data],
    )
    rp.add_argument("ids", nargs="*", type=_delivery_id, metavar="ID", help="delivery ids (see `webhookd deliveries`)")
    rp.add_argument(
        "--endpoint", metavar="NAME", default=argparse.SUPPRESS, help="every delivery of this endpoint in --status"
    )
    rp.add_argument(
        "--status",
        choices=DELIVERY_STATUSES,
        default=argparse.SUPPRESS,
        help="with --endpoint: the status to replay (default dead)",
    )

    no_config = " It reads no config: -c is refused."
    add(
        "gen-secret",
        cmd_gen_secret,
        "print a new signing secret (whsec_...)",
        None,
        "Print a new signing secret (whsec_...)." + no_config,
    )

    p = add(
        "sink",
        cmd_sink,
        "a local webhook receiver that prints what it gets",
        None,
        "A local webhook receiver that prints what it gets." + no_config,
    )
    p.add_argument("--port", type=_port, default=8479, help="port to listen on (default 8479; 0 = any)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--secret",
        action="append",
        metavar="S",
        help="verify signatures with this secret (repeatable)",
    )
    return parser


# ---------------------------------------------------------------------------------------------------- main


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def _tolerant_output() -> None:
    """Unencodable characters (``…`` on a latin-1 terminal) become ``?`` rather than an error."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError, TypeError):
                reconfigure(errors="replace")


def _silence_stdout() -> None:
    """After EPIPE (``webhookd devices | head``): point stdout at /dev/null so the exit flush is quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _is_config_option(arg: str) -> bool:
    return arg.startswith("-c") or arg == "--config" or arg.startswith("--config=")  # -c PATH, -cPATH, --config=PATH


def _misplaced_option(args: argparse.Namespace, extra: Sequence[str] = ()) -> str | None:
    """-c or --json given to a command that has no use for it: before the command it parses (the top-level
    parser has both), after it it is left over in ``extra``; either way the same words (issue 10, item 9)."""
    if (hasattr(args, "config") or any(map(_is_config_option, extra))) and not getattr(args, "takes_config", True):
        return f"{args.command} reads no config: -c/--config is not accepted"
    if (getattr(args, "json", False) or "--json" in extra) and not getattr(args, "takes_json", True):
        return f"{args.command} has no JSON output: --json is not accepted"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``webhookd`` and ``python -m webhookd``; returns the exit code."""
    try:
        _tolerant_output()
        parser = build_parser()
        # parse_args() is parse_known_args() plus "unrecognized arguments" for what is left over; a left-over -c
        # or --json is named the way one given before the command is
        args, extra = parser.parse_known_args(argv)
        handler: Handler | None = getattr(args, "handler", None)
        misplaced = _misplaced_option(args, extra) if handler is not None else None
        if misplaced:
            parser.print_usage(sys.stderr)
            print(f"webhookd: error: {misplaced}", file=sys.stderr)
            return EXIT_ERROR
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if handler is None:
            parser.print_help(sys.stderr)
            return EXIT_ERROR
        return handler(args)
    except SystemExit as e:
        return _exit_code(e.code)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_FAILURE
    except CLIError as e:
        print(e.message, file=sys.stderr)
        return e.code
    except Exception as e:
        if os.environ.get("WEBHOOKD_DEBUG"):
            import traceback

            traceback.print_exc()
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        print(f"error: {detail}", file=sys.stderr)
        return EXIT_ERROR
