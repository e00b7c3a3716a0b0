import json, socket, ssl, sys, time
port, ca, groups, seconds = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"blockgat"
def connect(source, kind):
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["h2"] if kind == "h2" else ["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    if kind == "h2":
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
    elif kind == "h1-after-request":
        tls.sendall(b"GET /info/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += tls.recv(65536)
    tls.setblocking(False)
    return tls
connections, results = [], []
for group in groups:
    result = {"refused": 0, "closed_after": [], "open": 0}
    results.append(result)
    for _ in range(group["count"]):
        try:
            connections.append((connect(group["source"], group["kind"]), group["kind"], time.monotonic(), result))
        except (OSError, ssl.SSLError):
            result["refused"] += 1
print("ready", flush=True)
end = time.monotonic() + seconds
while connections and time.monotonic() < end:
    still = []
    for tls, kind, since, result in connections:
        try:
            if kind == "h2":
                tls.sendall(PING)
            while True:
                if not tls.recv(65536):
                    raise ConnectionResetError()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            still.append((tls, kind, since, result))
        except (OSError, ssl.SSLError):
            result["closed_after"].append(round(time.monotonic() - since, 2))
    connections = still
    time.sleep(0.25)
for _, _, _, result in connections:
    result["open"] += 1
print(json.dumps(results), flush=True)
