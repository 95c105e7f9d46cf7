"""A stand-in application in interception tests: connects to ADDRESS PORT and prints what
it was answered, or `unreached` when nothing answers within a second.

Usage: connect.py ADDRESS PORT
"""

import socket
import sys


def main() -> None:
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as c:
            print(c.recv(64).decode().strip() or "closed", flush=True)
    except OSError:
        print("unreached", flush=True)


if __name__ == "__main__":
    main()
