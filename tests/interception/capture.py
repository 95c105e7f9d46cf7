"""A stand-in for the proxy's outbound listener in interception tests: accepts on PORT over
IPv4 and IPv6, reads where each connection was going (SO_ORIGINAL_DST, set by iptables
REDIRECT), prints `original ADDRESS:PORT` (`[ADDRESS]:PORT` for IPv6), answers `captured`
and closes.

Usage: capture.py PORT
"""

import selectors
import socket
import struct
import sys

SO_ORIGINAL_DST = 80  # IP6T_SO_ORIGINAL_DST has the same number


def listener(family: int, address: str, port: int) -> socket.socket:
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((address, port))
    s.listen(16)
    return s


def original(connection: socket.socket) -> str:
    if connection.family == socket.AF_INET:
        raw = connection.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, address = struct.unpack("!2xH4s8x", raw)
        return f"{socket.inet_ntop(socket.AF_INET, address)}:{port}"
    raw = connection.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port, address = struct.unpack("!2xH4x16s4x", raw)
    return f"[{socket.inet_ntop(socket.AF_INET6, address)}]:{port}"


def main() -> None:
    port = int(sys.argv[1])
    selector = selectors.DefaultSelector()
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        selector.register(listener(family, address, port), selectors.EVENT_READ)
    print("listening", flush=True)
    while True:
        for key, _ in selector.select():
            connection, _ = key.fileobj.accept()
            print(f"original {original(connection)}", flush=True)
            connection.sendall(b"captured\n")
            connection.close()


if __name__ == "__main__":
    main()
