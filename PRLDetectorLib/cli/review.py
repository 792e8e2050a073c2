"""``prl-detect review``: the browser review page over result folders (needs the ``review`` extra)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import RESULT_MARKER, review_folders

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``review``."""
    review = sub.add_parser(
        "review", help="review the PRLs of a result (or of a batch's patients) in a browser: Slicer views, "
                       "confirm / reject, notes, save")
    review.add_argument("results", metavar="RESULTS",
                        help="a detect result folder, or a batch output folder (every patient in it)")
    review.add_argument("--host", default=DEFAULT_HOST,
                        help="address to serve on (default: %(default)s, this computer only; another address lets "
                             "anyone who can reach it read and change these results)")
    review.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    review.add_argument("--reviewer", default="", help="your name, recorded in the saved files (or type it on the page)")
    review.set_defaults(func=cmd_review)


def cmd_review(args: argparse.Namespace) -> int:
    results = Path(args.results)
    if not results.is_dir():
        raise InputError(f"'{results}' is not a folder; give a detect result folder or a batch output folder.")
    folders = review_folders(results)
    if not folders:
        raise InputError(
            f"'{results}' is neither a detect result ({RESULT_MARKER}) nor a batch output with finished patients; "
            "give the --out folder of detect or of batch."
        )
    if not 0 < args.port < 65536:
        raise InputError(f"Port {args.port} is not a port number; give --port between 1 and 65535.")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # No screen (a server): VTK renders with EGL at once instead of failing over from X11 with a warning.
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    check_port(args.host, args.port)  # before anything heavy is imported or built: that takes seconds
    try:
        from PRLDetectorLib.review.page import serve
    except ImportError as error:
        raise InputError(
            f"The review page needs trame-slicer ({error.name} is missing); install it with "
            "pip install 'PRLDetectorLib[review]'."
        ) from None
    if not _is_loopback(args.host):
        logger.warning(
            "Serving on %s: anyone who can reach port %d there can see these patients' scans and change their "
            "review (the page has no login). Use it inside a trusted network only.", args.host, args.port,
        )
    serve(folders, args.host, args.port, args.reviewer, verbose=args.verbose)
    return 0


def check_port(host: str, port: int) -> None:
    """Refuse an address this computer cannot serve on, or a port that is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise InputError(f"Cannot serve on '{host}' ({error.strerror}); give --host an address of this computer.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the web server binds: reusing an address in TIME_WAIT is fine, a listening one is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise InputError(
                    f"Port {port} on {host} is already in use (another review page?); choose another with --port."
                ) from None
            raise InputError(f"Cannot serve on {host}:{port} ({error.strerror}); choose another --host or --port.") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
