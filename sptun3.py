import socket, sys, threading, collections
port = int(sys.argv[1]); chunk = int(sys.argv[2])
hist = collections.Counter()
def pump(src, dst, rec):
    buf = bytearray(chunk); mv = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if n == 0: break
        if rec: hist[(n + 16383) // 16384 * 16] += 1
        dst.sendall(mv[:n])
    try: dst.shutdown(socket.SHUT_WR)
    except OSError: pass
    if rec:
        tot = sum(hist.values()); print("reads", tot, "avg KiB", sum(k*v for k,v in hist.items())/tot, sorted(hist.items())[:12], flush=True); hist.clear()
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ls.bind(('127.0.0.1', port)); ls.listen(16)
while True:
    c, _ = ls.accept()
    head = b''
    while b'\r\n\r\n' not in head: head += c.recv(4096)
    target = head.split()[1].decode(); h, p = target.rsplit(':', 1)
    u = socket.create_connection((h, int(p)))
    c.sendall(b'HTTP/1.1 200 OK\r\n\r\n')
    threading.Thread(target=pump, args=(c, u, False), daemon=True).start()
    threading.Thread(target=pump, args=(u, c, True), daemon=True).start()
