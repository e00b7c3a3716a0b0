import socket, ssl, sys, time
port, ca, path, rate, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
context = ssl.create_default_context(cafile=ca)
context.set_alpn_protocols(["http/1.1"])
raw = socket.socket()
raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
raw.connect(("127.0.0.1", port))
tls = context.wrap_socket(raw, server_hostname="localhost")
tls.sendall(("GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path).encode())
started = time.monotonic()
received, paced = 0, None
head = b""
length = None
try:
    while True:
        if paced is None and time.monotonic() - started >= seconds:
            # Time is up: take the rest as fast as it comes.
            paced = received
            tls.settimeout(10)
        chunk = tls.recv(65536 if paced is not None else min(rate, 65536))
        if not chunk:
            # The connection ended before the body did.
            ended = "cut"
            break
        received += len(chunk)
        if length is None:
            head += chunk
            if b"\r\n\r\n" in head:
                header = head.split(b"\r\n\r\n", 1)[0]
                length = len(header) + 4 + int([line.split(b":")[1] for line in header.split(b"\r\n") if line.lower().startswith(b"content-length:")][0])
        if length is not None and received >= length:
            ended = "complete"
            break
        if paced is None:
            time.sleep(max(0.0, received / rate - (time.monotonic() - started)))
except (OSError, ssl.SSLError):
    ended = "cut"
print("%d %s %s" % (received if paced is None else paced, ended, head.split(b"\r\n", 1)[0].decode(errors="replace")))
