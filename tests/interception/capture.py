"""A stand-in for the proxy's outbound listener in interception tests: accepts on PORT,
reads where each connection was going (SO_ORIGINAL_DST, set by iptables REDIRECT), prints
`original ADDRESS:PORT`, answers `captured` and closes.

Usage: capture.py PORT
"""

import socket
import struct
import sys

SO_ORIGINAL_DST = 80


def main() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", int(sys.argv[1])))
    listener.listen(16)
    print("listening", flush=True)
    while True:
        connection, _ = listener.accept()
        raw = connection.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, address = struct.unpack("!2xH4s8x", raw)
        print(f"original {socket.inet_ntoa(address)}:{port}", flush=True)
        connection.sendall(b"captured\n")
        connection.close()


if __name__ == "__main__":
    main()
