#!/usr/bin/env python3
"""Memory per key: the same JSON records in one twincache worker and in one redis-server.

    python3 bench/memory.py [--keys 1000000] [--worker-bin target/release/worker]

Starts redis-server and a worker on free loopback ports, loads the same N records (~1 KiB of
JSON each: field names repeat, numbers and short strings vary) into both, and prints bytes
per key: redis INFO used_memory, and the worker's resident memory and its own count (stats
`bytes`), each minus the idle process. Needs redis-server (apt-get install -y redis-server).
"""
import argparse, json, os, random, socket, struct, subprocess, sys, time

WORDS = ("alpha beta gamma delta orbit cable river stone maple cedar quartz ember lunar solar "
         "harbor meadow canyon prairie summit valley glacier tundra coral reef lagoon island "
         "falcon raven heron sparrow otter badger lynx bison moose panda koala lemur").split()
CITIES = ["Berlin", "Paris", "Lagos", "Lima", "Osaka", "Austin", "Oslo", "Pune", "Quito", "Perth"]

def record(i, rng):
    bio = " ".join(rng.choice(WORDS) for _ in range(rng.randint(75, 95)))
    r = {
        "id": i, "username": f"user_{i}", "email": f"user{i}@example.com",
        "first_name": rng.choice(["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran"]),
        "last_name": rng.choice(["Smith", "Okafor", "Tanaka", "Garcia", "Novak", "Ivanova"]),
        "age": rng.randint(18, 90), "country": rng.choice(["DE", "FR", "NG", "PE", "JP", "US"]),
        "city": rng.choice(CITIES), "created_at": f"2024-{rng.randint(1,12):02d}-{rng.randint(1,28):02d}T12:{rng.randint(0,59):02d}:00Z",
        "last_login": f"2025-{rng.randint(1,12):02d}-{rng.randint(1,28):02d}T08:{rng.randint(0,59):02d}:00Z",
        "preferences": {"theme": rng.choice(["dark", "light"]), "language": rng.choice(["en", "de", "ja", "es"]),
                        "notifications": {"email": rng.random() < .5, "sms": rng.random() < .5, "push": rng.random() < .5}},
        "tags": rng.sample(WORDS, 4), "score": round(rng.random() * 10000, 2),
        "address": {"street": f"{rng.randint(1,999)} {rng.choice(WORDS).title()} Street", "zip": f"{rng.randint(10000,99999)}"},
        "bio": bio,
    }
    return json.dumps(r, separators=(",", ":")).encode()

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait_port(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close(); return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"port {port} never opened")

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def drain(sock, nbytes):
    got = 0
    while got < nbytes:
        d = sock.recv(1 << 20)
        if not d:
            sys.exit("connection closed")
        got += len(d)

def load_redis(port, n):
    s = socket.create_connection(("127.0.0.1", port)); rng = random.Random(1); buf = bytearray(); pending = 0
    for i in range(n):
        k, v = b"user:%d" % i, record(i, rng)
        buf += b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v); pending += 1
        if len(buf) > 1 << 20:
            s.sendall(buf); buf = bytearray(); drain(s, 5 * pending); pending = 0
    s.sendall(buf); drain(s, 5 * pending)

def load_worker(port, n):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(bytes([0xB7, ord("T"), ord("C"), 1]))
    rng = random.Random(1); buf = bytearray(); pending = 0
    for i in range(n):
        k, v = b"user:%d" % i, record(i, rng)
        body = struct.pack(">QBBQQI", i + 1, 2, 0, i + 1, 0, len(k)) + k + v
        buf += struct.pack(">I", len(body)) + body; pending += 1
        if len(buf) > 1 << 20:
            s.sendall(buf); buf = bytearray(); drain(s, 13 * pending); pending = 0
    s.sendall(buf); drain(s, 13 * pending)

def worker_stats(port):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(bytes([0xB7, ord("T"), ord("C"), 1]))
    body = struct.pack(">QBBQQI", 1, 6, 0, 0, 0, 0); s.sendall(struct.pack(">I", len(body)) + body)
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        data += s.recv(1 << 16)
    text = data[4 + 9:].decode()
    return dict(l.split(":", 1) for l in text.split("\r\n") if ":" in l)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--worker-bin", default="target/release/worker")
    ap.add_argument("--worker-args", default="", help="extra worker flags, e.g. '--encryption-key-file k'")
    a = ap.parse_args()
    rp, wp = free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rp), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    worker = subprocess.Popen([a.worker_bin, "--port", str(wp), "--threads", "1"] + a.worker_args.split(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(rp); wait_port(wp); time.sleep(0.3)
        redis_idle = int(subprocess.check_output(["redis-cli", "-p", str(rp), "info", "memory"]).decode().split("used_memory:")[1].split()[0])
        worker_idle = rss(worker.pid)
        sample = record(0, random.Random(1))
        t = time.time(); load_redis(rp, a.keys); t_r = time.time() - t
        t = time.time(); load_worker(wp, a.keys); t_w = time.time() - t
        time.sleep(0.5)
        redis_used = int(subprocess.check_output(["redis-cli", "-p", str(rp), "info", "memory"]).decode().split("used_memory:")[1].split()[0])
        st = worker_stats(wp); worker_rss = rss(worker.pid)
        n = a.keys
        r = (redis_used - redis_idle) / n; w = (worker_rss - worker_idle) / n; wc = int(st["bytes"]) / n
        print(f"{n} keys, ~{len(sample)}-byte JSON values (loaded in {t_r:.0f}s redis, {t_w:.0f}s worker)")
        print(f"redis-server used_memory:  {r:8.0f} bytes/key")
        print(f"worker resident memory:    {w:8.0f} bytes/key  ({w / r:.2f} of redis)")
        print(f"worker own count (bytes):  {wc:8.0f} bytes/key  ({wc / r:.2f} of redis); compression_ratio {st['compression_ratio']}")
    finally:
        redis.terminate(); worker.terminate()

if __name__ == "__main__":
    main()
