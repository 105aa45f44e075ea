"""Run inside the demo's network namespace (stdlib only, any Python):

    netns_probe.py up-lo-exec CMD..  bring the loopback up (the namespace's only interface), then exec CMD
    netns_probe.py look              JSON: what PATH offers and which broker ports answer
    netns_probe.py get URL           the body of URL on stdout (exit 1 with the reason if it fails)
"""
import fcntl
import json
import os
import struct
import shutil
import socket
import sys
import urllib.request

BROKER_PORTS = {"redis": 6379, "amqp": 5672, "rabbitmq-management": 15672}


def answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags, padded to 40 bytes


def loopback_up() -> None:
    """`ip link set lo up` without iproute2: the SIOCSIFFLAGS ioctl."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _, flags = struct.unpack(IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def main(argv):
    if argv[:1] == ["up-lo-exec"] and len(argv) > 1:
        loopback_up()
        os.execvp(argv[1], argv[1:])
    if argv[:1] == ["look"]:
        print(json.dumps({
            "which": {name: shutil.which(name) for name in
                      ("redis-server", "rabbitmq-server", "celery-health-exporter", "python")},
            "listening": {name: answers(port) for name, port in BROKER_PORTS.items()},
            "interfaces": [name for _, name in socket.if_nameindex()],
        }))
        return 0
    if argv[:1] == ["get"] and len(argv) == 2:
        try:
            with urllib.request.urlopen(argv[1], timeout=5) as response:
                sys.stdout.write(response.read().decode())
        except OSError as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
