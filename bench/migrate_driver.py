#!/usr/bin/env python3
"""The MIGRATE baseline of bench/migrate.sh: copies every key of a source Redis to a
destination with Redis' own MIGRATE ... COPY REPLACE KEYS, a SCAN batch at a time.

    python3 bench/migrate_driver.py SOURCE_PORT DESTINATION_PORT BATCH

One connection to the source, standard library only. Each SCAN COUNT BATCH reply is moved by
one MIGRATE call (the source serialises the keys, sends them to the destination, waits for its
answers, and replies); SCAN replies are gathered until they hold BATCH keys, so every MIGRATE
carries a full batch.
"""

import socket
import sys


def command(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")

    def call(self, *args):
        self.sock.sendall(command(*args))
        return self.reply()

    def reply(self):
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2]
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")


def main():
    source, destination, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    conn = Conn(source)
    cursor, pending, moved = b"0", [], 0

    def migrate(keys):
        reply = conn.call("MIGRATE", "127.0.0.1", destination, "", 0, 60000, "COPY", "REPLACE", "KEYS", *keys)
        if reply not in (b"OK", b"NOKEY"):
            raise RuntimeError(f"MIGRATE answered {reply!r}")
        return len(keys)

    while True:
        cursor, keys = conn.call("SCAN", cursor, "COUNT", batch)
        pending.extend(keys)
        while len(pending) >= batch:
            moved += migrate(pending[:batch])
            pending = pending[batch:]
        if cursor == b"0":
            break
    if pending:
        moved += migrate(pending)
    print(f"MIGRATE moved {moved} keys")


if __name__ == "__main__":
    main()
